"""The search page and its JSON API (`densevse serve`): one process, one opened Index, no authentication.

    GET  /                                   the page (page.html beside this file)
    GET  /api/search?q=TEXT&mode=images|regions&k=8    {"query", "mode", "hits"}
    POST /api/photo?k=8   (the photo as the body, or multipart field "photo")  {"mode": "photo", "hits", "captions"}
    GET  /api/image/{row}                    an indexed image's JPEG
    GET  /api/health                         {"ok": true, "counts"}

Bad input (empty or unparsable text, a query over MAX_QUERY_CHARS, not a photo, k out of range) is a 400
{"error": message} and the server goes on serving. Queries run one at a time: the stages are built on first use
and the model is not known to be safe to call from several threads at once; a search takes milliseconds, a photo
about a second.

Hostile requests: an upload is counted on the raw receive stream as it arrives (chunked or not, multipart or
not; multipart is parsed as it streams, and only the "photo" part is kept), so a body over the cap is a 413 once
the cap is passed, with no more than the cap read or held. A Host header other than the address the server was
started on (and its loopback aliases, and --allow-host names) is a 421: a page on another site cannot reach this
one through DNS rebinding.
"""
from __future__ import annotations

import ipaddress
import re
import sys
import threading
from pathlib import Path
from typing import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from densevse.pipeline.errors import ConfigError
from densevse.pipeline.search.query import Index
from densevse.pipeline.serving.rest import is_loopback
from densevse.stages.text import MAX_CAPTION_CHARS

MAX_PHOTO = 20 * 1024 * 1024
MAX_BODY = MAX_PHOTO + 65536  # + a multipart envelope
MAX_QUERY_CHARS = MAX_CAPTION_CHARS  # a query is embedded as a caption
MAX_PART_HEADERS = 16384  # bytes of headers per multipart part
MODES = ("images", "regions")
PAGE = Path(__file__).with_name("page.html")


class TooLarge(Exception):
    pass


def _bracketed(name: str) -> str:
    """A host as a Host header writes it: an IPv6 address in brackets."""
    try:
        return f"[{name}]" if ipaddress.ip_address(name).version == 6 else name
    except ValueError:
        return name


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> set[str]:
    """The Host headers the server answers (lower case): host:port it was started on, with localhost:port,
    127.0.0.1:port and [::1]:port when that host is a loopback address (port 80: also without the port), and
    each of `extra` (":port" added unless it has one). A wildcard address (0.0.0.0, ::) names no host: then
    `extra` must (ConfigError)."""
    wildcard = host in ("0.0.0.0", "::", "")
    if wildcard and not extra:
        raise ConfigError(f"serving on {host or 'every address'} needs --allow-host NAME for each name or address "
                          f"clients use: requests with any other Host header are refused")
    names = set() if wildcard else {host} | ({"localhost", "127.0.0.1", "::1"} if is_loopback(host) else set())
    out = {f"{_bracketed(n)}:{port}".lower() for n in names}
    for name in (n.strip().lower() for n in extra):
        out.add(name if re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):\d+", name) else f"{_bracketed(name)}:{port}")
    return out | {h[:-3] for h in out if h.endswith(":80")}  # browsers leave out the default port


class HostGuard:
    """ASGI middleware: a request whose Host header is not one of `hosts` gets 421 before the app sees it."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            got = [v.decode("latin-1").lower() for k, v in scope["headers"] if k == b"host"]
            if len(got) != 1 or got[0] not in self.hosts:
                shown = got[0][:100] if len(got) == 1 else f"{len(got)} Host headers"
                await JSONResponse({"error": f"misdirected request ({shown!r}): this server answers only for the "
                                             f"address it was started on and its --allow-host names"},
                                   status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(index: Index, hosts: set[str]) -> FastAPI:
    """The page and API over `index`, answering only requests whose Host header is one of `hosts`."""
    app = FastAPI(title="DenseVSE search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostGuard, hosts=hosts)
    lock = threading.Lock()
    page = PAGE.read_text()

    def locked(fn, *args):
        with lock:
            return fn(*args)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ValueError)  # BadInput and the other errors a user caused
    async def _bad_input(request, exc):
        return error(400, str(exc) or type(exc).__name__)

    @app.exception_handler(RequestValidationError)  # a malformed parameter (k=abc): 400 like the rest, not 422
    async def _bad_param(request, exc):
        return error(400, "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(TooLarge)
    async def _too_large(request, exc):
        return error(413, f"the photo is larger than {MAX_PHOTO // 2**20} MB")

    def check_k(k: int) -> int:
        if not 1 <= k <= 100:
            raise ValueError(f"k must be between 1 and 100, not {k}")
        return k

    def check_q(q: str) -> str:
        if len(q) > MAX_QUERY_CHARS:
            raise ValueError(f"the query is {len(q)} characters, over the limit of {MAX_QUERY_CHARS}")
        return q

    @app.get("/", response_class=HTMLResponse)
    def home():
        return page

    @app.get("/api/health")
    def health():
        return {"ok": True, "counts": index.info["counts"]}

    @app.get("/api/search")
    def search(q: str = "", mode: str = "images", k: int = 8):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        try:
            hits = locked(index.images if mode == "images" else index.regions, check_q(q), check_k(k))
        except LookupError as e:  # the index holds no vectors of that kind (a set without detector boxes)
            if type(e) is not LookupError:
                raise
            return error(404, str(e))
        return {"query": q, "mode": mode, "hits": hits}

    @app.post("/api/photo")
    async def photo(request: Request, k: int = 8):
        check_k(k)
        photo = await read_photo(request)

        def both():
            return locked(index.similar, photo, k), locked(index.captions, photo, 5)
        hits, captions = await run_in_threadpool(both)
        return {"mode": "photo", "hits": hits, "captions": captions}

    @app.get("/api/image/{row}")
    def image(row: int):
        if not 0 <= row < len(index.meta):
            return error(404, f"no image {row} (the index holds {len(index.meta)})")
        try:
            data = index.jpeg(row)
        except LookupError as e:
            return error(404, str(e))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


async def read_photo(request: Request) -> bytes:
    """The photo of a request: its body, or the multipart field "photo". Bytes are counted on the receive stream
    as they arrive and TooLarge is raised once the body passes MAX_BODY or the photo MAX_PHOTO (a declared
    Content-Length over the cap before reading any); a multipart body is parsed as it streams, keeping only the
    photo's bytes, so memory stays within the cap whatever the client sends."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ValueError(f"bad Content-Length {declared[:40]!r}")
        if int(declared) > MAX_BODY:
            raise TooLarge
    ctype = request.headers.get("content-type", "")
    sink = PhotoPart(ctype) if ctype.startswith("multipart/form-data") else RawBody()
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > MAX_BODY:
            raise TooLarge
        sink.feed(chunk)
    data = sink.finish()
    if not data:
        raise ValueError("no photo: send it as the request body or as the multipart field 'photo'")
    return data


class RawBody:
    """The body itself is the photo."""

    def __init__(self):
        self.chunks, self.size = [], 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > MAX_PHOTO:
            raise TooLarge
        self.chunks.append(chunk)

    def finish(self) -> bytes:
        return b"".join(self.chunks)


class PhotoPart(RawBody):
    """A multipart/form-data body, parsed as it streams (python-multipart): the bytes of its part named "photo"
    are kept (at most MAX_PHOTO), other parts' are dropped as they pass."""

    def __init__(self, content_type: str):
        from python_multipart.multipart import MultipartParser, parse_options_header

        super().__init__()
        self.parse_header = parse_options_header
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if not boundary:
            raise ValueError("bad multipart body: no boundary in its Content-Type")
        self.field, self.value, self.headers, self.name, self.photos, self.ended = b"", b"", [], None, 0, False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
            "on_part_data": self._data, "on_end": self._end})

    def _begin(self):
        self.field, self.value, self.headers, self.name = b"", b"", [], None

    def _grow(self, name: str, more: bytes):
        setattr(self, name, getattr(self, name) + more)
        if len(self.field) + len(self.value) + sum(len(f) + len(v) for f, v in self.headers) > MAX_PART_HEADERS:
            raise ValueError("bad multipart body: a part's headers are too long")

    def _field(self, data: bytes, start: int, end: int):
        self._grow("field", data[start:end])

    def _value(self, data: bytes, start: int, end: int):
        self._grow("value", data[start:end])

    def _header_end(self):
        self.headers.append((self.field.strip().lower(), self.value.strip()))
        self.field, self.value = b"", b""

    def _headers_done(self):
        for field, value in self.headers:
            if field == b"content-disposition":
                self.name = self.parse_header(value)[1].get(b"name")
        if self.name == b"photo":
            self.photos += 1
            if self.photos > 1:
                raise ValueError("bad multipart body: more than one field 'photo'")

    def _data(self, data: bytes, start: int, end: int):
        if self.name == b"photo":
            RawBody.feed(self, data[start:end])

    def _end(self):
        self.ended = True

    def feed(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise ValueError(f"bad multipart body: {e}") from None

    def finish(self) -> bytes:
        self.parser.finalize()
        if not self.ended:
            raise ValueError("bad multipart body: it ends before its closing boundary")
        if not self.photos:
            raise ValueError("no field 'photo' in the multipart body")
        return RawBody.finish(self)


def serve(root, model: str | None = None, host: str = "127.0.0.1", port: int = 8008, stages=None,
          allow_hosts: Iterable[str] = ()) -> None:
    """Open the index (with its own checkpoint unless `model`; query stages' model files from `stages`) and
    serve the page until interrupted, answering only the Host names of `allowed_hosts`."""
    import uvicorn

    hosts = allowed_hosts(host, port, allow_hosts)
    index = Index.open(root, model=model, stages=stages)
    if not is_loopback(host):
        print(f"warning: serving on {host}: the search page has no authentication, anyone who reaches "
              f"port {port} can search this index and read its images", file=sys.stderr)
    print(f"search page: http://{host}:{port}/ ({index.info['counts'].get('image', 0)} images)", file=sys.stderr)
    uvicorn.run(make_app(index, hosts), host=host, port=port, log_level="warning")
