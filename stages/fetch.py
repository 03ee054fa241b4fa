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

Every failure is a Reject whose reason starts with "download failed" (downloads and img2dataset's failures) or
names the tar, so ingest records "ingest: download failed: ..." and `--retry-rejected "ingest: download"` redoes
exactly those samples' shards. A download is retried (exponential backoff) only where a later try can succeed:
connection errors, timeouts, HTTP 5xx and 429; a 404 or an HTML page is not. Reasons name no URL (the
sample's source is recorded next to it), so a shard's reject counts stay a few kinds, not one per URL.
"""
from __future__ import annotations

import functools
import http.client
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path

from pydantic import Field

from stages.base import Params, Reject

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


def read_object(uri: str, max_bytes: int) -> bytes:
    """The bytes of an object (`s3://bucket/key`); missing, empty or over `max_bytes` is a Reject with the same
    reasons as a local file's. Other errors (the endpoint down, no credentials) are raised: they are not the
    sample's fault."""
    fs, p = _object_fs(uri)
    try:
        size = int(fs.info(p)["size"])
    except FileNotFoundError:
        raise Reject(f"missing image file {uri}") from None
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


def download_url(url: str, max_bytes: int, p: DownloadParams | None = None) -> bytes:
    """The body of `url`, retried with exponential backoff on connection errors, timeouts, 5xx and 429; every
    failure is a Reject "download failed: ..." (after the last try). The body is refused past `max_bytes`
    (by Content-Length first, then while reading) and unless its content type is image/* (a missing type or
    application/octet-stream, common for object stores, is left to the decoder)."""
    p = p or DownloadParams()
    opener = urllib.request.build_opener(_Redirects(p.max_redirects))
    tries = p.retries + 1
    for attempt in range(tries):
        if attempt:
            time.sleep(p.backoff_s * 2 ** (attempt - 1))
        try:
            return _get(opener, url, max_bytes, p)
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


def _get(opener, url: str, max_bytes: int, p: DownloadParams) -> bytes:
    url = urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")  # non-ASCII paths, as browsers send them
    req = urllib.request.Request(url, headers={"User-Agent": p.user_agent, "Accept": "image/*"})
    deadline = time.monotonic() + p.timeout_s
    with opener.open(req, timeout=p.timeout_s) as resp:
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
    """The bytes of `<file>.tar#<member>`; a missing tar or member, or one over `max_bytes`, is a Reject."""
    path, _, member = source.rpartition("#")
    try:
        index = _tar_index(path, _version(path))
    except FileNotFoundError:
        raise Reject(f"missing tar file {path}") from None
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
    """key -> error message of the samples img2dataset recorded as not downloaded, in its `<shard>.parquet`."""
    import pyarrow.parquet as pq

    with _open(path) as f:
        t = pq.read_table(f, columns=["key", "status", "error_message"]).to_pylist()
    return {str(r["key"]): r["error_message"] or r["status"] or "no reason recorded"
            for r in t if r["status"] != "success"}


def img2dataset_failure(source: str) -> Reject:
    """The Reject for `<file>.parquet#<key>`: img2dataset's own error message for that sample."""
    path, _, key = source.rpartition("#")
    try:
        error = _failures(path, _version(path)).get(key)
    except FileNotFoundError:
        return Reject(f"missing img2dataset metadata file {path}")
    if error is None:
        return Reject(f"img2dataset metadata {path} records sample {key} as downloaded, but its tar lacks it")
    return Reject(f"download failed in img2dataset: {error}")
