"""The search page and its JSON API (`densevse serve`): one process, one opened Index, no authentication.

    GET  /                                   the page (page.html beside this file)
    GET  /api/search?q=TEXT&mode=images|regions&k=8    {"query", "mode", "hits"}
    POST /api/photo?k=8   (the photo as the body, or multipart field "photo")  {"mode": "photo", "hits", "captions"}
    GET  /api/image/{row}                    an indexed image's JPEG
    GET  /api/health                         {"ok": true, "counts"}

Bad input (empty or unparsable text, not a photo, k out of range) is a 400 {"error": message} and the server
goes on serving. Queries run one at a time: the stages are built on first use and the model is not known to
be safe to call from several threads at once; a search takes milliseconds, a photo about a second.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipeline.search.query import Index
from pipeline.serving.rest import is_loopback

MAX_PHOTO = 20 * 1024 * 1024
MODES = ("images", "regions")
PAGE = Path(__file__).with_name("page.html")


class TooLarge(Exception):
    pass


def make_app(index: Index) -> FastAPI:
    app = FastAPI(title="DenseVSE search", docs_url=None, redoc_url=None, openapi_url=None)
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
            hits = locked(index.images if mode == "images" else index.regions, q, check_k(k))
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
    """The photo of a request: its body, or the multipart field "photo"; TooLarge past MAX_PHOTO, read or not
    (a Content-Length is refused before reading, a chunked body once it passes the cap)."""
    from starlette.formparsers import MultiPartException

    if int(request.headers.get("content-length") or 0) > MAX_PHOTO + 65536:  # + a multipart envelope
        raise TooLarge
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=MAX_PHOTO)
        except MultiPartException as e:
            if "maximum size" in str(e).lower():
                raise TooLarge from None
            raise ValueError(f"bad multipart body: {e}") from None
        field = form.get("photo")
        if field is None:
            raise ValueError("no field 'photo' in the multipart body")
        data = await field.read() if hasattr(field, "read") else str(field).encode()
    else:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_PHOTO:
                raise TooLarge
        data = bytes(body)
    if len(data) > MAX_PHOTO:
        raise TooLarge
    if not data:
        raise ValueError("no photo: send it as the request body or as the multipart field 'photo'")
    return data


def serve(root, model: str | None = None, host: str = "127.0.0.1", port: int = 8008) -> None:
    """Open the index (with its own model unless `model`) and serve the page until interrupted."""
    import uvicorn

    index = Index.open(root, model=model)
    if not is_loopback(host):
        print(f"warning: serving on {host}: the search page has no authentication, anyone who reaches "
              f"port {port} can search this index and read its images", file=sys.stderr)
    print(f"search page: http://{host}:{port}/ ({index.info['counts'].get('image', 0)} images)", file=sys.stderr)
    uvicorn.run(make_app(index), host=host, port=port, log_level="warning")
