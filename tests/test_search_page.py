"""The search page end to end: `densevse serve` in its own process on a real index, its JSON API over HTTP,
and the page driven in headless Chromium (typing, Enter, the mode switch, a photo upload, a bad query).

Set DENSEVSE_SCREENSHOT=1 to write the README's docs/search-page.png (otherwise the screenshot goes to tmp).
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from densevse.pipeline.serving import rest
from densevse.pipeline.tracking.server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's (setup.sh installs it)
SENTENCE = "a red circle left of a blue square"
PHRASE = "a blue square"
K = 8


def call(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 120):
    """(status, headers, body) of a request; an HTTP error status is returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def search(base: str, q: str, mode: str = "images", k: int = K):
    return call(f"{base}/api/search?" + urllib.parse.urlencode({"q": q, "mode": mode, "k": k}))


@pytest.fixture(scope="module")
def server(search_index, tiny_run, tmp_path_factory):
    """Base URL of `python -m densevse.pipeline.cli serve` on a free loopback port, warmed: its first sentence and first
    photo have built the parser and the detector, so the page's waits measure the page, not model loading. The
    stage models are the tiny run's, given as a user gives theirs (-s; a checkpoint's own paths are never used)."""
    cfg, _ = tiny_run
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "densevse.pipeline.cli", "serve", "--index", str(search_index),
                             "--port", str(port),
                             "-s", f"stages.regions.params.config={cfg.stages.regions.params.config}",
                             "-s", f"stages.parse.params.model_dir={cfg.stages.parse.params.model_dir}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        rest.wait_http(proc, f"{base}/api/health", log_path)
        status, _, body = search(base, SENTENCE)
        assert status == 200, body
        status, _, jpeg = call(f"{base}/api/image/0")
        assert status == 200, jpeg
        status, _, body = call(f"{base}/api/photo?k=1", data=jpeg, headers={"Content-Type": "image/jpeg"})
        assert status == 200, body
        yield base
    finally:
        rest.stop(proc)
        log.close()
    assert proc.poll() is not None


@pytest.fixture(scope="module")
def counts(server) -> dict:
    return json.loads(call(f"{server}/api/health")[2])["counts"]


def test_http_api(server, counts):
    status, headers, body = search(server, SENTENCE)
    assert status == 200 and headers["content-type"].startswith("application/json")
    out = json.loads(body)
    assert out["query"] == SENTENCE and out["mode"] == "images"
    hits = out["hits"]
    assert len(hits) == min(K, counts["image"])
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert {"key", "image", "source", "split", "width", "height", "captions"} <= set(hits[0])

    out = json.loads(search(server, PHRASE, "regions", 3)[2])
    assert out["mode"] == "regions" and len(out["hits"]) == min(3, counts["region"])
    for h in out["hits"]:
        x0, y0, x1, y1 = h["box"]
        assert 0 <= x0 < x1 <= h["width"] + 1 and 0 <= y0 < y1 <= h["height"] + 1

    status, headers, jpeg = call(f"{server}/api/image/0")
    assert status == 200 and headers["content-type"] == "image/jpeg" and jpeg[:3] == b"\xff\xd8\xff"
    assert call(f"{server}/api/image/{counts['image']}")[0] == 404

    # the photo as the raw body, and as the multipart field "photo" (after another field)
    raw = json.loads(call(f"{server}/api/photo?k=3", data=jpeg, headers={"Content-Type": "image/jpeg"})[2])
    assert raw["mode"] == "photo" and len(raw["hits"]) == min(3, counts["image"]) and raw["captions"]
    assert {"text", "score", "key"} <= set(raw["captions"][0])
    b = "densevse-test-boundary"
    form = (f'--{b}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="photo"; filename="p.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{b}--\r\n".encode()
    status, _, body = call(f"{server}/api/photo?k=3", data=form,
                           headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    assert status == 200, body
    assert [h["key"] for h in json.loads(body)["hits"]] == [h["key"] for h in raw["hits"]]

    # what a user gets wrong: a 400 with the reason (413 for a photo over the cap), and serving goes on
    for status, _, body in (search(server, ""), search(server, SENTENCE, "captions"), search(server, SENTENCE, k=0),
                            call(f"{server}/api/photo", data=b"not a photo", headers={"Content-Type": "image/jpeg"})):
        assert status == 400 and json.loads(body)["error"], (status, body)
    conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(server).port, timeout=60)
    conn.putrequest("POST", "/api/photo")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(21 * 2**20))
    conn.endheaders()  # refused on its Content-Length, before a byte of the body
    r = conn.getresponse()
    assert r.status == 413 and "MB" in json.loads(r.read())["error"]
    conn.close()

    status, _, body = call(f"{server}/api/health")
    assert status == 200 and json.loads(body) == {"ok": True, "counts": counts}


def test_page(server, counts, tmp_path):
    from playwright import sync_api  # a dev dependency: missing is a failure, not a skip
    assert Path(CHROMIUM).is_file(), f"no {CHROMIUM}: setup.sh installs Debian's chromium"
    expect = sync_api.expect
    api_images = json.loads(search(server, SENTENCE)[2])["hits"]
    api_regions = json.loads(search(server, PHRASE, "regions")[2])["hits"]
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(call(f"{server}/api/image/0")[2])

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(60_000)
            page_errors = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(server + "/")
            hits = page.locator("#results .hit")

            def loaded_images() -> list[int]:
                """naturalWidth of every card's image, once all of them have finished loading."""
                page.wait_for_function("() => [...document.querySelectorAll('.hit img')].every(i => i.complete)")
                return page.eval_on_selector_all(".hit img", "imgs => imgs.map(i => i.naturalWidth)")

            # a sentence -> images, with the Search button
            page.fill("#q", SENTENCE)
            page.click("#go")
            expect(hits).to_have_count(len(api_images))
            scores = [float(s) for s in page.locator(".hit .score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True)
            assert all(abs(s - h["score"]) < 6e-4 for s, h in zip(scores, api_images, strict=True))
            assert [k.strip() for k in page.locator(".hit .key").all_inner_texts()] == [h["key"] for h in api_images]
            assert all(w > 0 for w in loaded_images())
            assert page.locator(".box").count() == 0
            if api_images[0]["captions"]:
                assert page.locator(".hit .caption").first.inner_text() == api_images[0]["captions"][0]

            # a phrase -> regions, with Enter: each box drawn inside its image, where the hit says
            page.select_option("#mode", "regions")
            page.fill("#q", PHRASE)
            page.press("#q", "Enter")
            expect(page.locator(".hit .box")).to_have_count(len(api_regions))
            assert all(w > 0 for w in loaded_images())
            drawn = page.eval_on_selector_all(".hit", """cards => cards.map(c => {
                const r = (e) => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
                return {img: r(c.querySelector('img')), box: r(c.querySelector('.box'))};
            })""")
            for d, h in zip(drawn, api_regions, strict=True):
                (il, it, ir, ib), (bl, bt, br, bb) = d["img"], d["box"]
                assert il - 1 <= bl < br <= ir + 1 and it - 1 <= bt < bb <= ib + 1, (d, h)
                sx, sy = (ir - il) / h["width"], (ib - it) / h["height"]
                want = [il + h["box"][0] * sx, it + h["box"][1] * sy, il + h["box"][2] * sx, it + h["box"][3] * sy]
                assert max(abs(a - b) for a, b in zip([bl, bt, br, bb], want)) <= 1.5, (d, h)
            shot = ROOT / "docs" / "search-page.png" if os.environ.get("DENSEVSE_SCREENSHOT") else tmp_path / "p.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)

            # a photo -> similar images and its captions
            page.set_input_files("#photo", str(photo))
            expect(page.locator("#status")).to_contain_text("images like photo.jpg")
            expect(hits).to_have_count(min(K, counts["image"]))
            assert page.locator("#captions li").count() > 0
            assert page.locator(".box").count() == 0
            assert all(w > 0 for w in loaded_images())

            # an empty query: the server's reason shown, and the next query works
            page.fill("#q", "")
            page.click("#go")
            expect(page.locator("#error")).to_be_visible()
            assert page.locator("#error").inner_text().strip()
            expect(hits).to_have_count(0)
            page.select_option("#mode", "images")
            page.fill("#q", SENTENCE)
            page.press("#q", "Enter")
            expect(hits).to_have_count(len(api_images))
            expect(page.locator("#error")).to_be_hidden()
            assert not page_errors, page_errors
        finally:
            browser.close()
