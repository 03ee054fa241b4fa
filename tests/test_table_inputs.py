"""The inputs users bring: a table of image URLs / paths + captions (csv, tsv, jsonl, parquet), img2dataset's
webdataset output (tars + per-shard parquet), and ingest's downloader against a real HTTP server on 127.0.0.1."""
import contextlib
import csv
import io
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from densevse.pipeline.config import DatasetConfig, parse_config
from densevse.pipeline.datasets import READERS, read_dataset
from densevse.pipeline.errors import ConfigError, DatasetError
from densevse.stages import fetch
from densevse.stages.base import INGEST, Reject, ShardOutage, check_shard_rejections, empty_row
from densevse.stages.fetch import USER_AGENT, DownloadParams, call_with_deadline, download_url
from densevse.stages.images import read_bytes


def _jpeg(seed: int = 0, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ a real HTTP server

class _Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    agents: list[str] = []
    later_ok = False  # /later.jpg: 404 until the end-to-end test "fixes" the server

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", **headers):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", headers.pop("length", str(len(body))))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        n = _Handler.hits[path] = _Handler.hits.get(path, 0) + 1
        _Handler.agents.append(self.headers.get("User-Agent", ""))
        if path.startswith("/img/"):
            self._send(200, _jpeg(int(path.split("/")[-1].split(".")[0])))
        elif path == "/redirect.jpg":
            self._send(302, b"", "text/plain", Location="/img/7.jpg")
        elif path == "/loop.jpg":
            self._send(302, b"", "text/plain", Location="/loop.jpg")
        elif path == "/goto":  # a redirect to the URL in ?to=
            self._send(302, b"", "text/plain", Location=urllib.parse.parse_qs(self.path.split("?", 1)[1])["to"][0])
        elif path == "/slow.jpg":
            time.sleep(1.5)
            self._send(200, _jpeg())
        elif path == "/page.html":
            self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
        elif path == "/flaky.jpg":  # 503 twice, then the image: retried
            self._send(200, _jpeg(3)) if n > 2 else self._send(503, b"busy", "text/plain")
        elif path == "/down.jpg":
            self._send(503, b"busy", "text/plain")
        elif path == "/later.jpg" and _Handler.later_ok:
            self._send(200, _jpeg(5))
        elif path == "/big.jpg":
            self._send(200, b"x" * 5000)
        else:
            self._send(404, b"no such thing", "text/plain")


class _Public(_Handler):
    """The server on 127.0.0.2, which the deny_private tests take for a public address: /goto redirects, any
    other path is one image (seed 99), so a test can tell which server answered."""

    def do_GET(self):
        if self.path.startswith("/goto?"):
            return super().do_GET()
        self._send(200, _jpeg(99))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the slow response's client has gone: expected
        pass


@contextlib.contextmanager
def _serving(httpd: _Server):
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield "http://%s:%d" % httpd.server_address
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server():
    with _serving(_Server(("127.0.0.1", 0), _Handler)) as url:
        yield url


@pytest.fixture
def public_server(server, monkeypatch):
    """_Public on 127.0.0.2, on the port of `server` (so one name can resolve to either), and deny_private's
    address check taking 127.0.0.2 for a public address: every other address is judged as in production."""
    try:
        httpd = _Server(("127.0.0.2", urllib.parse.urlsplit(server).port), _Public)
    except OSError as e:
        pytest.skip(f"cannot listen on 127.0.0.2 ({e})")
    real = fetch.address_kind
    monkeypatch.setattr(fetch, "address_kind", lambda ip: None if ip == "127.0.0.2" else real(ip))
    with _serving(httpd) as url:
        yield url


FAST = DownloadParams(timeout_s=0.5, retries=2, backoff_s=0.01)
CAP = 32 * 2**20


def test_downloads_good_and_redirected_images_with_the_user_agent(server):
    assert download_url(f"{server}/img/1.jpg", CAP, FAST) == _jpeg(1)
    assert download_url(f"{server}/redirect.jpg", CAP, FAST) == _jpeg(7)
    assert _Handler.agents[-1] == USER_AGENT and USER_AGENT.startswith("densevse/")
    assert read_bytes(f"{server}/img/2.jpg", download=DownloadParams(user_agent="me/1 (+mailto:x@y)")) == _jpeg(2)
    assert _Handler.agents[-1] == "me/1 (+mailto:x@y)"


def test_5xx_is_retried_with_backoff_then_succeeds(server):
    t0 = time.monotonic()
    assert download_url(f"{server}/flaky.jpg", CAP, DownloadParams(retries=2, backoff_s=0.1)) == _jpeg(3)
    assert _Handler.hits["/flaky.jpg"] == 3 and time.monotonic() - t0 >= 0.3  # waits 0.1 + 0.2


@pytest.mark.parametrize("path,params,reason,tries", [
    ("/missing.jpg", FAST, "download failed: HTTP 404 Not Found", 1),  # not retried
    ("/page.html", FAST, "download failed: content type text/html is not an image", 1),
    ("/down.jpg", FAST, "download failed: HTTP 503 Service Unavailable (3 tries)", 3),
    ("/slow.jpg", DownloadParams(timeout_s=0.5, retries=1, backoff_s=0),
     "download failed: timed out after 0.5 s (2 tries)", 2),
    ("/loop.jpg", DownloadParams(max_redirects=3), "download failed: more than 3 redirects", 4),
    ("/big.jpg", FAST, "download failed: 5000 bytes, over the cap of 1000 bytes", 1),
])
def test_failed_downloads_are_rejects_with_their_reason(server, path, params, reason, tries):
    before = _Handler.hits.get(path, 0)
    with pytest.raises(Reject) as e:
        download_url(f"{server}{path}", 1000 if path == "/big.jpg" else CAP, params)
    assert str(e.value) == reason
    assert _Handler.hits[path] - before == tries


def test_connection_refused_and_bad_urls_are_rejects():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(Reject, match=r"^download failed: connection error \(.*refused.*\) \(2 tries\)$"):
        download_url(f"http://127.0.0.1:{port}/a.jpg", CAP, DownloadParams(retries=1, backoff_s=0))
    with pytest.raises(Reject, match="^download failed: "):
        download_url("http://127.0.0.1:notaport/a.jpg", CAP, FAST)


DENY = DownloadParams(timeout_s=2, retries=1, backoff_s=0, deny_private=True)


def test_deny_private_refuses_loopback_hosts_unless_off(server):
    """deny_private refuses 127.0.0.1 and a name resolving to it, before any request (the server sees none);
    off (the default outside the cloud configs), 127.0.0.1 downloads as before."""
    port = urllib.parse.urlsplit(server).port
    before = dict(_Handler.hits)
    for url in (f"{server}/img/1.jpg", f"http://localhost:{port}/img/1.jpg"):
        with pytest.raises(Reject, match=r"^download failed: host resolves to a loopback address \(deny_private\)$"):
            download_url(url, CAP, DENY)
    assert _Handler.hits == before
    assert download_url(f"{server}/img/1.jpg", CAP, FAST) == _jpeg(1)
    assert DownloadParams().deny_private is False


def test_deny_private_default_comes_from_the_environment_which_the_cloud_configs_set(monkeypatch):
    import yaml

    from conftest import ROOT

    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    assert any("DENSEVSE_DENY_PRIVATE=1" in c and "/etc/environment" in c for c in aws["setup_commands"])
    job = next(d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay.yaml").read_text()) if d["kind"] == "RayJob")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["DENSEVSE_DENY_PRIVATE"] == "1"
    monkeypatch.setenv("DENSEVSE_DENY_PRIVATE", "1")
    assert DownloadParams().deny_private is True
    assert INGEST.get("image_caption")().params.deny_private is True
    assert DownloadParams(deny_private=False).deny_private is False
    monkeypatch.setenv("DENSEVSE_DENY_PRIVATE", "0")
    assert DownloadParams().deny_private is False


def test_deny_private_checks_every_redirect_hop(server, public_server):
    """A public host (127.0.0.2 here) answering with a redirect to 127.0.0.1, or to the cloud metadata address:
    the hop is refused, and the loopback server never sees the request."""
    assert download_url(f"{public_server}/any.jpg", CAP, DENY) == _jpeg(99)  # the public host itself is fine
    before = _Handler.hits.get("/img/7.jpg", 0)
    for target, kind in ((f"{server}/img/7.jpg", "loopback"),
                         ("http://169.254.169.254/latest/meta-data/", "link-local")):
        with pytest.raises(Reject, match=rf"^download failed: host resolves to a {kind} address \(deny_private\)$"):
            download_url(f"{public_server}/goto?to={urllib.parse.quote(target)}", CAP, DENY)
    assert _Handler.hits.get("/img/7.jpg", 0) == before
    assert download_url(f"{public_server}/goto?to={urllib.parse.quote(f'{server}/img/7.jpg')}", CAP, FAST) == _jpeg(7)


def test_deny_private_connects_to_the_address_it_checked(server, public_server, monkeypatch):
    """DNS rebinding: a name that first resolves to an allowed address, then to 127.0.0.1. The connection goes to
    the address that was checked (one lookup per connection), so the image comes from 127.0.0.2. The system
    resolver cannot be made to answer this way, so socket.getaddrinfo is wrapped to rewrite that one name."""
    port = urllib.parse.urlsplit(server).port
    answers, lookups = iter(["127.0.0.2"] + ["127.0.0.1"] * 5), []
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "rebind.test":
            host = next(answers)
            lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert download_url(f"http://rebind.test:{port}/img/4.jpg", CAP, DENY) == _jpeg(99)
    assert lookups == ["127.0.0.2"]


@pytest.mark.parametrize("target,scheme", [("file:///etc/passwd", "file"), ("ftp://127.0.0.1/a.jpg", "ftp")])
def test_redirect_to_another_scheme_is_refused_with_its_own_reason(server, target, scheme):
    before = _Handler.hits.get("/goto", 0)
    with pytest.raises(Reject) as e:
        download_url(f"{server}/goto?to={urllib.parse.quote(target)}", CAP, FAST)
    assert str(e.value) == f"download failed: redirect to a {scheme}: URL refused"
    assert _Handler.hits["/goto"] - before == 1  # not retried


def test_call_with_deadline_bounds_a_call_that_blocks():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"sleep did not return within 0\.2 s"):
        call_with_deadline(time.sleep, 0.2, 30)
    assert time.monotonic() - t0 < 1.5
    assert call_with_deadline(sum, 1, [1, 2]) == 3
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(divmod, 1, 1, 0)


def test_a_dns_lookup_that_hangs_is_bounded_by_the_timeout(server, monkeypatch):
    """socket.getaddrinfo has no timeout: a resolver that does not answer held a download (and its ingest thread)
    for as long as the system resolver retried. Here the lookup of one name sleeps 5 s (the system resolver cannot
    be made to hang on cue); the try ends at timeout_s with the timeout's reason."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "hang.test":
            time.sleep(5)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    t0 = time.monotonic()
    with pytest.raises(Reject, match=r"^download failed: timed out after 0\.3 s \(2 tries\)$"):
        download_url("http://hang.test/a.jpg", CAP, DownloadParams(timeout_s=0.3, retries=1, backoff_s=0))
    assert time.monotonic() - t0 < 2


def test_a_host_that_does_not_exist_is_its_own_input_reason_not_retried():
    """NXDOMAIN (the name does not exist: a dead link) is input; a resolver that cannot answer (EAI_AGAIN) stays
    a connection error, which check_shard_rejections counts as an outage."""
    try:
        socket.getaddrinfo("densevse-test.invalid", 80)
        pytest.skip("the resolver answers for .invalid")
    except socket.gaierror as e:
        if e.errno not in fetch.HOST_NOT_FOUND:
            pytest.skip(f"this machine's resolver does not answer ({e})")
    t0 = time.monotonic()
    with pytest.raises(Reject, match=r"^download failed: host not found$"):
        download_url("http://densevse-test.invalid/a.jpg", CAP, DownloadParams(retries=3, backoff_s=1))
    assert time.monotonic() - t0 < 1  # no backoff: not retried


def test_ingest_records_download_failures_by_prefix(server):
    """Ingest downloads a batch's URLs in parallel; each failure is that row's "ingest: download failed: ..."."""
    paths = ["/img/4.jpg", "/missing.jpg", "/page.html", "/redirect.jpg"]
    rows = [empty_row(key=f"k{i}", source=f"{server}{p}", captions=json.dumps(["A red square on grey."]))
            for i, p in enumerate(paths)]
    stage = INGEST.get("image_caption")({"timeout_s": 0.5, "retries": 0, "threads": 4})
    out = {r["source"].removeprefix(server): r for r in stage.process(rows)}
    assert out["/img/4.jpg"]["reject"] == "" and out["/img/4.jpg"]["width"] == 48
    assert out["/redirect.jpg"]["reject"] == ""
    assert out["/missing.jpg"]["reject"] == "ingest: download failed: HTTP 404 Not Found"
    assert out["/page.html"]["reject"] == "ingest: download failed: content type text/html is not an image"


def test_a_download_outage_rejects_the_samples_and_then_stops_the_shard(server):
    """A web dataset whose image host is down (nothing listens on its port): each sample is the rejection
    "download failed: connection error" (a dead host is normal input), and check_shard_rejections, which the run
    calls before writing a shard, stops it: 12 of 16 samples failed the same non-input way."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    urls = [f"{dead}/img/{i}.jpg" for i in range(12)] + [f"{server}/img/{i}.jpg" for i in range(4)]
    rows = [empty_row(key=f"k{i}", shard="train-000002", source=u, captions=json.dumps(["A photo."]))
            for i, u in enumerate(urls)]
    out = INGEST.get("image_caption")({"timeout_s": 1, "retries": 0, "threads": 8}).process(rows)
    assert all(r["reject"].startswith("ingest: download failed: connection error (") for r in out[:12])
    assert [r["reject"] for r in out[12:]] == [""] * 4
    with pytest.raises(ShardOutage, match=r"^shard train-000002: 12 of 16 samples rejected as 'ingest: download "
                                          r"failed: connection error'"):
        check_shard_rejections(out)
    check_shard_rejections(out[8:])  # 4 of 8: a few dead hosts in a shard are input


def test_download_params_are_validated_up_front():
    with pytest.raises(ConfigError, match=r"stages\.ingest\.params\.timeout_s"):
        parse_config({"stages": {"ingest": {"impl": "image_caption", "params": {"timeout_s": 0}}}})
    with pytest.raises(ConfigError, match=r"stages\.ingest\.params\.retrys"):
        parse_config({"stages": {"ingest": {"impl": "image_caption", "params": {"retrys": 3}}}})


# ------------------------------------------------------------------------------------------------------ tables

ROWS = [  # (image, caption, split, license)
    ("imgs/a.jpg", "A dog runs.", "train", "cc-by"),
    ("imgs/b.jpg", "A cat sits.", "val", "cc0"),
    ("imgs/a.jpg", "A brown dog runs on grass.", "train", "other"),
    ("https://example.org/photos/c.jpg?size=l", "A bird flies.", "", "cc0"),
]


def _write_table(path: Path, rows=ROWS, header=("image", "text", "split", "license")):
    dicts = [dict(zip(header, r)) for r in rows]
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(dicts), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(d) + "\n" for d in dicts))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, header, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(dicts)
    return path


def _table_cfg(file: str, **table) -> DatasetConfig:
    return DatasetConfig(kind="table", root=".", table={"file": file, "url_col": "image", "caption_col": "text",
                                                        **table})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_readers_group_captions_per_image(tmp_path, suffix):
    path = _write_table(tmp_path / f"caps{suffix}")
    cfg = _table_cfg(path.name, split_col="split", save_additional_columns=["license"])
    specs = list(READERS.get("table")(tmp_path, cfg))
    assert [s["captions"] for s in specs] == [["A dog runs.", "A brown dog runs on grass."], ["A cat sits."],
                                              ["A bird flies."]]
    assert [s["split"] for s in specs] == ["train", "val", "train"]  # an empty split cell: default_split
    assert [s["source"] for s in specs] == [str(tmp_path / "imgs/a.jpg"), str(tmp_path / "imgs/b.jpg"),
                                            "https://example.org/photos/c.jpg?size=l"]
    assert [s["gold"] for s in specs] == [{"columns": {"license": "cc-by"}}, {"columns": {"license": "cc0"}},
                                          {"columns": {"license": "cc0"}}]  # the image's first row
    keys = [s["key"] for s in specs]
    assert keys[0].startswith("table_caps_a_") and keys[2].startswith("table_caps_c_")
    assert len(set(keys)) == 3 and not any("." in k for k in keys)
    assert keys == [s["key"] for s in READERS.get("table")(tmp_path, cfg)]  # stable
    other = list(read_dataset(_table_cfg(path.name), tmp_path))  # no split_col: every row is "train"
    assert {s["split"] for s in other} == {"train"} and [s["gold"] for s in other] == [{}, {}, {}]


def test_same_file_name_at_two_urls_is_two_samples(tmp_path):
    _write_table(tmp_path / "t.csv", [("https://a.example/x/1.jpg", "One.", "", ""),
                                      ("https://b.example/x/1.jpg", "Two.", "", "")])
    specs = list(READERS.get("table")(tmp_path, _table_cfg("t.csv")))
    assert len({s["key"] for s in specs}) == 2


@pytest.mark.parametrize("option,value,message", [
    ("url_col", "url", r"caps\.csv: dataset\.table\.url_col 'url' is not a column of the table; its columns are "
                       r"\['image', 'text', 'split', 'license'\]"),
    ("caption_col", "caption", r"caps\.csv: dataset\.table\.caption_col 'caption' is not a column"),
    ("split_col", "fold", r"caps\.csv: dataset\.table\.split_col 'fold' is not a column"),
    ("save_additional_columns", ["license", "width"],
     r"caps\.csv: dataset\.table\.save_additional_columns\[1\] 'width' is not a column"),
])
def test_bad_column_names_name_the_option_column_and_file(tmp_path, option, value, message):
    _write_table(tmp_path / "caps.csv")
    with pytest.raises(DatasetError, match=message):
        list(READERS.get("table")(tmp_path, _table_cfg("caps.csv", **{option: value})))


def test_bad_tables_are_dataset_errors_naming_file_and_line(tmp_path):
    _write_table(tmp_path / "climb.csv", [("../../etc/passwd", "A file.", "", "")])
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        list(READERS.get("table")(tmp_path, _table_cfg("climb.csv")))
    _write_table(tmp_path / "empty.csv", [("a.jpg", "A.", "", ""), ("", "B.", "", "")])
    with pytest.raises(DatasetError, match=r"empty\.csv:3: image is empty"):
        list(READERS.get("table")(tmp_path, _table_cfg("empty.csv")))
    _write_table(tmp_path / "splits.csv", [("a.jpg", "A.", "train", ""), ("a.jpg", "B.", "test", "")])
    with pytest.raises(DatasetError, match=r"splits\.csv:3: image 'a\.jpg' is in split 'test' here but in 'train'"):
        list(READERS.get("table")(tmp_path, _table_cfg("splits.csv", split_col="split")))
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "text": "A."}\n{"image": \n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not valid JSON"):
        list(READERS.get("table")(tmp_path, _table_cfg("bad.jsonl")))
    with pytest.raises(DatasetError, match="missing dataset file"):
        list(READERS.get("table")(tmp_path, _table_cfg("nowhere.csv")))


def test_table_config_is_checked_up_front():
    with pytest.raises(ConfigError, match=r"dataset\.table\.file: required for dataset\.kind='table'"):
        parse_config({"dataset": {"kind": "table", "root": "x"}})
    with pytest.raises(ConfigError, match=r"dataset\.table\.input_format: cannot tell the format of 'caps\.xlsx'"):
        parse_config({"dataset": {"kind": "table", "root": "x", "table": {"file": "caps.xlsx"}}})
    with pytest.raises(ConfigError, match=r"dataset\.table\.urlcol: Extra inputs"):
        parse_config({"dataset": {"kind": "table", "root": "x", "table": {"file": "c.csv", "urlcol": "u"}}})
    cfg = parse_config({"dataset": {"kind": "table", "root": "x", "table": {"file": "c.txt", "input_format": "tsv"}}})
    assert cfg.dataset.table.input_format == "tsv"


# ------------------------------------------------------------------------------------------------- img2dataset

def write_img2dataset(root: Path) -> Path:
    """Two img2dataset shards as it writes them: tar (jpg + txt + json), parquet (every input row, with its
    status) and _stats.json. Shard 00000: 2 downloaded, 1 failed; 00001: 1 downloaded, 1 'success' in the
    parquet that the tar lacks."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    shards = {"00000": [("000000000", "success", None, "A red kite."), ("000000001", "failed_to_download",
                                                                        "HTTP Error 404: Not Found", "Lost."),
                        ("000000002", "success", None, "A blue sea.")],
              "00001": [("000010000", "success", None, "A green field."),
                        ("000010001", "success", None, "Not in the tar.")]}
    for shard, rows in shards.items():
        with wds.TarWriter(str(root / f"{shard}.tar")) as sink:
            for i, (key, status, _, caption) in enumerate(rows):
                if status == "success" and caption != "Not in the tar.":
                    sink.write({"__key__": key, "jpg": _jpeg(i), "txt": caption.encode(),
                                "json": json.dumps({"key": key, "status": status, "url": f"http://x/{key}.jpg"}).encode()})
        pq.write_table(pa.table({"url": [f"http://x/{r[0]}.jpg" for r in rows], "caption": [r[3] for r in rows],
                                 "key": [r[0] for r in rows], "status": [r[1] for r in rows],
                                 "error_message": [r[2] for r in rows], "width": [48 if r[1] == "success" else None
                                                                                for r in rows]}),
                       root / f"{shard}.parquet")
        (root / f"{shard}_stats.json").write_text(json.dumps({"count": len(rows)}))
    return root


def test_img2dataset_reader_and_its_rejections(tmp_path):
    root = write_img2dataset(tmp_path / "i2d")
    cfg = DatasetConfig(kind="img2dataset", root=root, img2dataset={"save_additional_columns": ["url"]})
    specs = {s["key"]: s for s in read_dataset(cfg, root)}
    assert sorted(specs) == ["i2d_000000000", "i2d_000000001", "i2d_000000002", "i2d_000010000", "i2d_000010001"]
    assert specs["i2d_000000000"]["source"] == f"{root}/00000.tar#000000000.jpg"
    assert specs["i2d_000000001"]["source"] == f"{root}/00000.parquet#000000001"
    assert specs["i2d_000000002"]["captions"] == ["A blue sea."] and {s["split"] for s in specs.values()} == {"train"}
    assert specs["i2d_000000000"]["gold"] == {"columns": {"url": "http://x/000000000.jpg"}}
    rows = [empty_row(key=k, source=s["source"], captions=json.dumps(s["captions"]), gold=json.dumps(s["gold"]))
            for k, s in specs.items()]
    out = {r["key"]: r for r in INGEST.get("image_caption")().process(rows)}
    assert {k: r["reject"] for k, r in out.items()} == {
        "i2d_000000000": "", "i2d_000000002": "", "i2d_000010000": "",
        "i2d_000000001": "ingest: download failed in img2dataset: HTTP Error 404: Not Found",
        "i2d_000010001": f"ingest: no member 000010001.jpg in {root}/00001.tar"}
    assert out["i2d_000000002"]["width"] == 48


def test_img2dataset_bad_folders(tmp_path):
    with pytest.raises(DatasetError, match="no img2dataset shards"):
        list(read_dataset(DatasetConfig(kind="img2dataset", root=tmp_path), tmp_path))
    root = write_img2dataset(tmp_path / "i2d")
    cfg = DatasetConfig(kind="img2dataset", root=root, img2dataset={"save_additional_columns": ["licence"]})
    with pytest.raises(DatasetError, match=r"00000\.parquet: no column 'licence' "
                                           r"\(dataset\.img2dataset\.save_additional_columns\)"):
        list(read_dataset(cfg, root))
    (root / "00001.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DatasetError, match=r"00001\.tar: not a readable tar file"):
        list(read_dataset(DatasetConfig(kind="img2dataset", root=root), root))


# -------------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_preprocess_a_table_of_urls(server, stage_models, tmp_path, capsys, monkeypatch):
    """`densevse preprocess` on a csv of URLs served on 127.0.0.1 (plus one local file): good images become
    samples, each failed download is a recorded rejection with its reason, and `--retry-rejected "ingest:
    download"` redoes them once the server is fixed."""
    import webdataset as wds

    from conftest import ROOT
    from densevse.pipeline.cli.main import main
    from densevse.pipeline import shardset

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "local.jpg").write_bytes(_jpeg(20))
    rows = [(f"{server}/img/10.jpg", "A noisy square of colour."), (f"{server}/img/11.jpg", "A grey photo."),
            (f"{server}/img/10.jpg", "Another caption of the first photo."),
            (f"{server}/redirect.jpg", "A photo behind a redirect."), (f"{server}/later.jpg", "Not there yet."),
            (f"{server}/page.html", "A web page."), (f"{server}/slow.jpg", "A slow photo."),
            ("images/local.jpg", "A local photo.")]
    _write_table(tmp_path / "caps.csv", rows, header=("image", "text"))
    over = ["dataset.kind=table", f"dataset.root={tmp_path}", "dataset.table.file=caps.csv",
            "dataset.table.url_col=image", "dataset.table.caption_col=text", f"run.output_dir={tmp_path / 'out'}",
            "stages.ingest.params.timeout_s=0.5", "stages.ingest.params.retries=0", "shards.samples_per_shard=4",
            "stages.regions.impl=gold_boxes", "stages.regions.params={}", "stages.features.params.input_size=96",
            f"stages.parse.params.model_dir={stage_models[1]}", "ray.num_cpus=2"]
    args = ["preprocess", "pipeline.yaml", "--quiet", "--json", *[a for o in over for a in ("-s", o)]]
    monkeypatch.chdir(ROOT)  # the stage model path is relative to the repo root
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.split("==\n", 1)[1])
    assert summary["samples"] == 7 and summary["shards"] == 2
    sd = tmp_path / "out" / "shards"

    def manifest():
        return {r["source"].removeprefix(server): r for r in pq.read_table(sd / shardset.MANIFEST).to_pylist()}

    m = manifest()
    assert {s: r["reason"] for s, r in m.items() if r["status"] == "rejected"} == {
        "/later.jpg": "ingest: download failed: HTTP 404 Not Found",
        "/page.html": "ingest: download failed: content type text/html is not an image",
        "/slow.jpg": "ingest: download failed: timed out after 0.5 s"}
    assert {s for s, r in m.items() if r["status"] == "ok"} == {"/img/10.jpg", "/img/11.jpg", "/redirect.jpg",
                                                               str(tmp_path / "images" / "local.jpg")}
    assert m["/img/10.jpg"]["n_captions"] == 2
    reasons = summary["splits"]["train"]
    assert reasons["n_rejected"] == 3 and reasons["reject: ingest: download failed: HTTP 404 Not Found"] == 1
    samples = [s for tar in shardset.shard_paths(sd, "train") for s in wds.WebDataset(str(tar), shardshuffle=False)]
    assert len(samples) == 4
    first = next(json.loads(s["json"]) for s in samples if s["__key__"] == m["/img/10.jpg"]["key"])
    assert [c["text"].replace(" .", ".") for c in first["captions"]] == [rows[0][1], rows[2][1]]  # tokenized

    _Handler.later_ok = True  # the server fixed: /later.jpg now serves an image
    capsys.readouterr()
    assert main([*args, "--retry-rejected", "ingest: download"]) == 0
    retried = json.loads(capsys.readouterr().out.split("==\n", 1)[1])
    assert retried["retry_rejected"]["samples_retried"] == 3 and retried["shards_written"] >= 1
    m = manifest()
    assert m["/later.jpg"]["status"] == "ok" and m["/page.html"]["status"] == "rejected"
