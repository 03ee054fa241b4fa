"""Serving takes data, not addresses, and bounded data: the search page (`densevse serve`, a real uvicorn process on
127.0.0.1 over a real tiny index) refuses a Host header it was not started for (DNS rebinding), stops a chunked
upload with no Content-Length at the cap without holding the body (its RSS is measured), and refuses an
over-long query; a 5 MB one-word caption is refused on its length before any other work.
(REST image cells: tests/test_serving.py.)"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from densevse.pipeline.serving import rest
from densevse.pipeline.tracking.server import free_port
from tests.untrusted_fixture import tiny_checkpoint, tiny_index

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
BOUNDARY = "densevse-upload-boundary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(port, pid) of `python -m densevse.pipeline.cli serve` on a tiny index, bound to 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("page")
    root = tiny_index(tmp, tiny_checkpoint(tmp / "best.pt"))
    port, log_path = free_port(), tmp / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "densevse.pipeline.cli", "serve", "--index", str(root), "--port",
                                 str(port), "-s", f"run.output_dir={tmp}"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rest.wait_http(proc, f"http://127.0.0.1:{port}/api/health", log_path, timeout=300)
        yield port, proc.pid
    finally:
        rest.stop(proc)


def request(port: int, method: str, path: str, host: str | None = None, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body or {}) of one request with exactly the given Host header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for k, v in {**(headers or {}), "Content-Length": str(len(body or b""))}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if r.headers.get("content-type", "").startswith("application/json") else {}
    finally:
        conn.close()


def test_only_the_host_it_was_started_on_is_answered(page):
    port, _ = page
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/api/health", host)[0] == 200, host
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}"):
        for method, path in (("GET", "/"), ("GET", "/api/health"), ("GET", "/api/image/0"),
                             ("GET", "/api/search?q=a+red+circle"), ("POST", "/api/photo")):
            status, body = request(port, method, path, host, b"x" if method == "POST" else None)
            assert status == 421 and "misdirected" in body["error"], (host, path, status, body)


def _vm(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _chunked_upload(port: int, ctype: str, head: bytes, total: int, tail: bytes) -> tuple[int, int, bytes]:
    """POST /api/photo with Transfer-Encoding: chunked and no Content-Length: `head`, `total` bytes, `tail`,
    sent from a thread while this one reads the answer. Returns (status, bytes sent, response body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sent, done = [0], threading.Event()

    def send():
        block = b"\xab" * (256 * 1024)
        frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        try:
            sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
            while sent[0] < total and not done.is_set():
                sock.sendall(frame)
                sent[0] += len(block)
            sock.sendall(f"{len(tail):x}\r\n".encode() + tail + b"\r\n0\r\n\r\n")
        except OSError:  # the server stopped reading and closed: expected
            pass

    sock.sendall(f"POST /api/photo?k=3 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
                 f"Content-Type: {ctype}\r\n\r\n".encode())
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    finally:
        done.set()
        sender.join(60)
        sock.close()
    status = int(answer.split(b" ", 2)[1])
    return status, sent[0], answer.partition(b"\r\n\r\n")[2]


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@pytest.mark.parametrize("form", ["multipart", "raw"])
def test_chunked_upload_without_length_stops_at_the_cap_without_holding_it(page, form):
    """100 MiB sent chunked with no Content-Length (multipart: a small field, then the photo part): a 413 once the
    20 MiB cap is passed, the server's peak RSS grows by far less than the body, and it goes on serving."""
    from densevse.pipeline.search.app import MAX_BODY

    port, pid = page
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--{BOUNDARY}\r\n'
            f'Content-Disposition: form-data; name="photo"; filename="p.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode() if form == "multipart" else b"\xff\xd8\xff"
    tail = f"\r\n--{BOUNDARY}--\r\n".encode() if form == "multipart" else b""
    request(port, "GET", "/api/health")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _vm(pid, "VmRSS")
    status, sent, body = _chunked_upload(port, CTYPE if form == "multipart" else "image/jpeg", head, 100 * MiB, tail)
    peak = _vm(pid, "VmHWM")
    assert status == 413 and "larger than 20 MB" in json.loads(body)["error"], (status, body[:300])
    assert (peak - before) < 48 * MiB, f"server peak RSS grew {(peak - before) / MiB:.0f} MiB for a 100 MiB body"
    assert sent < 100 * MiB, f"the server read all {sent / MiB:.0f} MiB"  # it stopped reading near the cap
    assert sent >= MAX_BODY - 256 * 1024
    assert request(port, "GET", "/api/health")[0] == 200


def test_over_long_queries_and_captions_are_refused_quickly(page, tmp_path):
    port, _ = page
    t = time.perf_counter()
    status, body = request(port, "GET", "/api/search?" + urllib.parse.urlencode({"q": "a" * 5000, "mode": "regions"}))
    assert status == 400 and body["error"] == "the query is 5000 characters, over the limit of 1000", body
    assert time.perf_counter() - t < 5
    t = time.perf_counter()
    try:  # 5 MB in a URL: uvicorn's HTTP parser drops the request before the app (no status); either way, refused
        status = request(port, "GET", "/api/search?q=" + "a" * 5_000_000)[0]
    except ConnectionError:
        status = None
    assert status in (None, 400, 413, 414, 431) and time.perf_counter() - t < 5, status
    assert request(port, "GET", "/api/health")[0] == 200

    # A 5 MB single word: refused on its length by the caption check that ingest, parse and every query share,
    # before the parser is even looked for (this checkpoint has none it may load).
    from densevse.pipeline.errors import BadInput
    from densevse.pipeline.serving.embedder import Embedder
    from densevse.stages.ingest import check_caption

    word = "w" * 5_000_000
    t = time.perf_counter()
    assert check_caption(word, 60)[1] == "caption is 5000000 characters, over the limit of 1000"
    e = Embedder.from_checkpoint(tiny_checkpoint(tmp_path / "best.pt"))
    with pytest.raises(BadInput, match="text 0: caption is 5000000 characters, over the limit of 1000"):
        e.texts([word])
    assert time.perf_counter() - t < 5 and "parse" not in e._built


def test_the_model_api_takes_image_data_not_addresses(tmp_path):
    """The registered model's predict (what `mlflow models serve` runs per request): a path that exists, one that
    does not, file:// and http:// to a live server on 127.0.0.1 (which redirects), file://http://...: one 400
    reason for all, nothing read or fetched. (Through the real REST server: tests/test_serving.py, slow.)"""
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    from densevse.pipeline.serving.pyfunc import EmbeddingPyfunc
    from tests.untrusted_fixture import recording_server

    py = EmbeddingPyfunc()
    py.load_context(PythonModelContext(artifacts={"checkpoint": str(tiny_checkpoint(tmp_path / "best.pt"))},
                                       model_config=None))
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n")
    answers = set()
    with recording_server() as (base, seen):
        for cell in (str(photo), str(tmp_path / "missing.png"), f"file://{photo}", f"{base}/a.jpg",
                     f"file://{base}/a.jpg", f"http://localhost:{base.rsplit(':', 1)[1]}/a.jpg"):
            with pytest.raises(MlflowException) as e:
                py.predict(None, pd.DataFrame({"image": [cell]}))
            answers.add((e.value.get_http_status_code(), e.value.message))
    assert seen == [] and len(answers) == 1, (seen, answers)
    assert answers.pop() == (400, "row 0: an image must be base64 or a base64 data: URI (paths and URLs are not "
                                  "taken over the model's API)")
