"""Image sources that are not a plain local file: http(s) URLs, objects in an object store, members of
img2dataset tars, and img2dataset's record of a sample it failed to download. stages/images.read_bytes
dispatches here (`source_kind`).

Source URIs (what a dataset reader puts in a sample's `source`):

    https://host/cat.jpg            downloaded (DownloadParams: timeout, retries, byte cap, content type, user agent)
    s3://bucket/data/cat.jpg        read through fsspec (s3fs; gs:// with gcsfs): a dataset.root in object storage
    /data/i2d/00000.tar#00000012.jpg    the member `00000012.jpg` of that tar (img2dataset's webdataset output)
    /data/i2d/00000.parquet#00000012    img2dataset's record of sample 00000012, which it failed to download:
                                        reading it is a Reject with img2dataset's own error message
    (the tar and parquet forms may name an s3:// or gs:// file too)

Every failure of the input is a Reject whose reason starts with "download failed" (downloads and
img2dataset's failures) or names the file, so ingest records "ingest: download failed: ..." and
`--retry-rejected "ingest: download"` redoes exactly those samples' shards. A download is retried (exponential
backoff) only where a later try can succeed: connection errors, timeouts, HTTP 5xx and 429; a 404 or an HTML page
is not. Reasons name no URL (the sample's source is recorded next to it), so a shard's reject counts stay a few
kinds, not one per URL. Reading an object (s3://, gs://) is different: the object missing is the input's fault,
every other failure (the endpoint down, SlowDown, an expired token) the storage's, raised as SourceUnavailable,
which fails the shard's task instead of rejecting its samples.

`deny_private` (on in the cloud cluster configs, through DENSEVSE_DENY_PRIVATE=1) refuses URLs whose host resolves
to a loopback, private, link-local (the cloud metadata service, 169.254.169.254), multicast, reserved or otherwise
non-global address: a dataset of URLs is someone else's input, and must not make the cluster fetch from itself or
its network. The check is made on every redirect hop against the address actually connected to (the host is
resolved once per connection, then that address is dialled, so a second DNS answer cannot slip past it); env
proxies are ignored with it on, since through a proxy the address is the proxy's. Every DNS lookup is bounded by
the try's `timeout_s` (getaddrinfo has no timeout of its own).
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import os
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path

from pydantic import Field

from densevse.stages.base import Params, Reject, SourceUnavailable

try:
    VERSION = metadata.version("densevse")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    VERSION = "0"
USER_AGENT = f"densevse/{VERSION} (image-caption preprocessing; like img2dataset)"
CHUNK = 1 << 16
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class DownloadParams(Params):
    """How ingest downloads an http(s) source (part of IngestParams: `stages.ingest.params` in pipeline.yaml)."""
    timeout_s: float = Field(10.0, gt=0)  # per try: connecting, waiting for the response, and reading the body
    retries: int = Field(2, ge=0)  # more tries after the first, for connection errors, timeouts, 5xx and 429
    backoff_s: float = Field(0.5, ge=0)  # wait before retry n: backoff_s * 2**(n-1)
    max_redirects: int = Field(5, ge=0)
    user_agent: str = Field(USER_AGENT, min_length=1)  # add a contact URL when crawling others' servers
    threads: int = Field(16, ge=1)  # parallel downloads within a batch
    # Refuse hosts that resolve to non-global addresses (loopback, private, link-local ...), on every redirect hop;
    # default from DENSEVSE_DENY_PRIVATE=1, which the cloud cluster configs set (module docstring)
    deny_private: bool = Field(default_factory=lambda: os.environ.get("DENSEVSE_DENY_PRIVATE", "") not in ("", "0"))


OBJECT_SCHEMES = ("s3://", "gs://")


def source_kind(source: str) -> str:
    """"url", "tar" (`<file>.tar#<member>`), "img2dataset_failed" (`<file>.parquet#<key>`), "object"
    (`s3://...`, `gs://...`) or "file"."""
    if source.startswith(("http://", "https://")):
        return "url"
    path, sep, frag = source.rpartition("#")
    if sep and frag and path.endswith(".tar"):
        return "tar"
    if sep and frag and path.endswith(".parquet"):
        return "img2dataset_failed"
    if source.startswith(OBJECT_SCHEMES):
        return "object"
    return "file"


def _object_fs(uri: str):
    """(fsspec filesystem, path) for an object URI; no listings cache (the dataset may change between runs)."""
    import fsspec

    return fsspec.core.url_to_fs(uri, use_listings_cache=False)


def _version(path: str):
    """What changes when the file does, as a cache key: a local file's mtime, an object's ETag (else size and
    mtime). FileNotFoundError when it is absent."""
    if not path.startswith(OBJECT_SCHEMES):
        return Path(path).stat().st_mtime_ns
    fs, p = _object_fs(path)
    info = fs.info(p)
    return str(info.get("ETag") or info.get("etag") or (info.get("size"), info.get("mtime") or info.get("updated")))


def _open(path: str):
    if not path.startswith(OBJECT_SCHEMES):
        return open(path, "rb")
    fs, p = _object_fs(path)
    return fs.open(p, "rb")


@contextlib.contextmanager
def _reading(path: str, missing: str):
    """Around the reads of `path`: its absence is the Reject `missing`; for an object URI every other failure but
    a Reject (the endpoint down, throttling, credentials: botocore / s3fs errors, however
    s3fs re-raised them) is the storage's, never the input's: SourceUnavailable, which fails the shard."""
    try:
        yield
    except FileNotFoundError:
        raise Reject(missing) from None
    except Reject:
        raise
    except Exception as e:
        if path.startswith(OBJECT_SCHEMES):
            raise SourceUnavailable(f"reading {path}: {type(e).__name__}: {e}") from e
        raise


def read_object(uri: str, max_bytes: int) -> bytes:
    """The bytes of an object (`s3://bucket/key`); missing, empty or over `max_bytes` is a Reject with the same
    reasons as a local file's. Any other failure is SourceUnavailable (`_reading`): not the sample's fault."""
    with _reading(uri, f"missing image file {uri}"):
        fs, p = _object_fs(uri)
        size = int(fs.info(p)["size"])
        if size > max_bytes:
            raise Reject(f"image file {uri} is {size} bytes, over the cap of {max_bytes} bytes")
        with fs.open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Reject(f"image file {uri} is over the cap of {max_bytes} bytes")
    if not data:
        raise Reject(f"empty image file {uri}")
    return data


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limit: int):
        self.max_redirections = self.max_repeats = limit  # urllib raises HTTPError 3xx past this many

    def http_error_302(self, req, fp, code, msg, headers):
        """Follow only http(s): urllib itself follows ftp:// and answers file:// with an HTTPError 3xx, which
        would read as too many redirects."""
        target = headers.get("Location") or headers.get("URI")
        scheme = target and urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, target)).scheme.lower()
        if scheme and scheme not in ("http", "https"):
            fp.close()
            raise Reject(f"download failed: redirect to a {scheme}: URL refused")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def call_with_deadline(fn, timeout_s: float, *args):
    """fn(*args), or TimeoutError once `timeout_s` has passed. For calls with no timeout of their own
    (socket.getaddrinfo): fn runs in a daemon thread, which is left to finish by itself when abandoned."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name=f"densevse-{getattr(fn, '__name__', 'call')}", daemon=True)
    t.start()
    t.join(max(timeout_s, 0.0))
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', 'call')} did not return within {timeout_s:.3g} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def address_kind(ip: str) -> str | None:
    """Why `ip` is no public internet address ("loopback", "private", "link-local", "multicast", "reserved",
    "unspecified", else "non-global", e.g. carrier-grade NAT), or None when it is one. An IPv4-mapped IPv6
    address counts as its IPv4 address."""
    a = ipaddress.ip_address(ip.partition("%")[0])
    a = getattr(a, "ipv4_mapped", None) or a
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(a, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if a.is_global else "non-global"


def _connect(address, timeout, source_address=None, *, deadline: float, deny_private: bool):
    """http.client's socket.create_connection, with the DNS lookup bounded by the try's `deadline`, and with
    `deny_private` every resolved address checked (address_kind) before the connection goes to one of those very
    addresses (no second lookup)."""
    host, port = address
    infos = call_with_deadline(socket.getaddrinfo, deadline - time.monotonic(), host, port, 0, socket.SOCK_STREAM)
    if deny_private:
        for *_, sockaddr in infos:
            kind = address_kind(sockaddr[0])
            if kind:
                raise Reject(f"download failed: host resolves to a {kind} address (deny_private)")
    error = OSError(f"no address for {host}")
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


class _Dialing:
    """A urllib handler whose connections take their socket from `connect` (a _connect partial), in place of
    http.client's socket.create_connection."""

    def __init__(self, connect):
        super().__init__()
        self.connect = connect

    def do_open(self, http_class, req, **kwargs):
        def connection(*args, **kw):
            conn = http_class(*args, **kw)
            conn._create_connection = self.connect
            return conn

        return super().do_open(connection, req, **kwargs)


class _HTTPHandler(_Dialing, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_Dialing, urllib.request.HTTPSHandler):
    pass


def _opener(p: DownloadParams, deadline: float):
    """urllib's opener for one try: every connection, the redirects' too, through _connect."""
    connect = functools.partial(_connect, deadline=deadline, deny_private=p.deny_private)
    handlers = [_Redirects(p.max_redirects), _HTTPHandler(connect), _HTTPSHandler(connect)]
    if p.deny_private:
        handlers.append(urllib.request.ProxyHandler({}))  # through a proxy, the address checked would be its own
    return urllib.request.build_opener(*handlers)


# getaddrinfo's answers that say the name does not exist (the input's fault), unlike EAI_AGAIN (a resolver down)
HOST_NOT_FOUND = frozenset(getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n))


def download_url(url: str, max_bytes: int, p: DownloadParams | None = None) -> bytes:
    """The body of `url`, retried with exponential backoff on connection errors, timeouts, 5xx and 429; every
    failure is a Reject "download failed: ..." (after the last try). The body is refused past `max_bytes`
    (by Content-Length first, then while reading) and unless its content type is image/* (a missing type or
    application/octet-stream, common for object stores, is left to the decoder). `timeout_s` bounds each try,
    DNS lookups included; a host that does not exist is not retried."""
    p = p or DownloadParams()
    tries = p.retries + 1
    for attempt in range(tries):
        if attempt:
            time.sleep(p.backoff_s * 2 ** (attempt - 1))
        try:
            return _get(url, max_bytes, p)
        except urllib.error.HTTPError as e:
            e.close()
            if 300 <= e.code < 400:
                reason = f"more than {p.max_redirects} redirects"
                break
            reason = f"HTTP {e.code} {e.reason}"
            if e.code not in RETRY_STATUS:
                break
        except (TimeoutError, socket.timeout):
            reason = f"timed out after {p.timeout_s:g} s"
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                reason = f"timed out after {p.timeout_s:g} s"
            elif isinstance(e.reason, socket.gaierror) and e.reason.errno in HOST_NOT_FOUND:
                reason = "host not found"
                break
            else:
                reason = f"connection error ({e.reason})"
        except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short mid-body ...
            reason = f"connection error ({e})"
        except ValueError as e:  # a malformed URL ("http://", bad port)
            reason = f"bad URL ({e})"
            break
    else:
        reason += f" ({tries} tries)" if tries > 1 else ""
    raise Reject(f"download failed: {reason}")


def _get(url: str, max_bytes: int, p: DownloadParams) -> bytes:
    url = urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")  # non-ASCII paths, as browsers send them
    req = urllib.request.Request(url, headers={"User-Agent": p.user_agent, "Accept": "image/*"})
    deadline = time.monotonic() + p.timeout_s
    with _opener(p, deadline).open(req, timeout=p.timeout_s) as resp:
        ctype = (resp.headers.get_content_type() if resp.headers.get("Content-Type") else "")
        if ctype and not ctype.startswith("image/") and ctype != "application/octet-stream":
            raise Reject(f"download failed: content type {ctype} is not an image")
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise Reject(f"download failed: {length} bytes, over the cap of {max_bytes} bytes")
        parts, size = [], 0
        while chunk := resp.read(CHUNK):
            parts.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise Reject(f"download failed: over the cap of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError  # a server trickling bytes: the timeout bounds the whole try
    if not size:
        raise Reject("download failed: empty response")
    return b"".join(parts)


@functools.lru_cache(maxsize=8)
def _tar_index(path: str, version) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size): found once per tar (and process), so reading a shard's N members
    costs N seeks, not N scans of the tar (for an object: ranged reads of its headers)."""
    with _open(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}


def read_tar_member(source: str, max_bytes: int) -> bytes:
    """The bytes of `<file>.tar#<member>`; a missing or unreadable tar, a missing member, or one over `max_bytes`
    is a Reject; a failing object store is SourceUnavailable (`_reading`)."""
    path, _, member = source.rpartition("#")
    with _reading(path, f"missing tar file {path}"):
        try:
            index = _tar_index(path, _version(path))
        except tarfile.TarError as e:
            raise Reject(f"unreadable tar file {path} ({e})") from None
        if member not in index:
            raise Reject(f"no member {member} in {path}")
        offset, size = index[member]
        if size > max_bytes:
            raise Reject(f"image {member} in {path} is {size} bytes, over the cap of {max_bytes} bytes")
        with _open(path) as f:
            f.seek(offset)
            data = f.read(size)
    if len(data) != size:
        raise Reject(f"tar file {path} is cut short in member {member}")
    if not data:
        raise Reject(f"empty image {member} in {path}")
    return data


@functools.lru_cache(maxsize=8)
def _failures(path: str, version) -> dict[str, str]:
    """key -> error message of the samples img2dataset recorded as not downloaded, in its `<shard>.parquet`
    (read whole first, so that a storage failure and a corrupt file are told apart: `_reading`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(path) as f:
        data = f.read()
    try:
        t = pq.read_table(pa.BufferReader(data), columns=["key", "status", "error_message"]).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise Reject(f"unreadable img2dataset metadata file {path} ({e})") from None
    return {str(r["key"]): r["error_message"] or r["status"] or "no reason recorded"
            for r in t if r["status"] != "success"}


def img2dataset_failure(source: str) -> Reject:
    """The Reject for `<file>.parquet#<key>`: img2dataset's own error message for that sample (a failing object
    store is raised: SourceUnavailable)."""
    path, _, key = source.rpartition("#")
    try:
        with _reading(path, f"missing img2dataset metadata file {path}"):
            error = _failures(path, _version(path)).get(key)
    except Reject as r:
        return r
    if error is None:
        return Reject(f"img2dataset metadata {path} records sample {key} as downloaded, but its tar lacks it")
    return Reject(f"download failed in img2dataset: {error}")
