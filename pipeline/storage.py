"""Every path is a location: one pathlib-style type for local disk and object storage (s3://, gs://, file://).

`location(value)` gives a local `Path` (a file:// URI too) or, for an object-store URI, universal_pathlib's `UPath`
over fsspec (s3fs, gcsfs) with no listings cache: other processes (Ray workers, a re-run) write and delete
objects, and a stale listing would hide a finished shard or show a deleted one. Both have `/`, `name`, `parent`,
`open`, `read_bytes`/`read_text`, `exists`, `is_file`, `is_dir`, `glob`, `stat().st_size`, `unlink`, `resolve`,
and `str()` gives the path or the URI back, so callers write one code path for both kinds.

What really differs between the two kinds lives here, and only that:
  writing / put_atomic   a file a reader (or a crash) never sees half of: a temporary file beside it + os.replace
                         locally, a local temporary file uploaded in one PUT (atomic on S3) for a URI;
                         sweep_temp removes the local temporaries a crashed writer left
  local                  a real local file for code that needs one (torch.load, MLflow artifacts, a log written
                         by file descriptor): the file itself, or a temporary copy downloaded and/or uploaded back
  stamp                  what changes when a file is rewritten: a local file's mtime_ns, an object's ETag
  ray_storage            Ray Train's storage_path (+ a pyarrow filesystem for a URI)
  put_if / read_versioned  S3's conditional PUTs (compare-and-swap), for the shard dir's lease
Local paths keep os.replace semantics and stay plain `Path`s, which is what Ray, pyarrow and torch take.

S3 endpoint and credentials come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), read by botocore, which s3fs uses: nothing S3-specific is in
pipeline.yaml.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple, Union

if TYPE_CHECKING:
    from upath import UPath

SCHEMES = ("s3", "gs", "file")
Location = Union[Path, "UPath"]  # a local Path, or a UPath for "scheme://bucket/key"
TMP_SUFFIX = ".tmp"  # local temporaries are ".<name>.<pid>.tmp" (swept at the start of a run: sweep_temp)


def scheme(value) -> str | None:
    """The URI scheme ("s3", "gs", "file"), or None for a local path."""
    s = str(value)
    return s.split("://", 1)[0].lower() if "://" in s else None


def is_local(value) -> bool:
    """True for a local path (file:// included): what local file I/O (flock, a generated dataset) can use."""
    return scheme(value) in (None, "file")


def location(value: str | Path | UPath) -> Location:
    """A configured path as a location: a `Path` for a local path or file:// URI, a `UPath` for an object-store
    URI (scheme lower-cased, no trailing '/'). Idempotent. ValueError names the scheme when it is not one of
    SCHEMES, or a URI that names no bucket."""
    s = str(value)
    sch = scheme(s)
    if sch is None:
        return value if isinstance(value, Path) else Path(value)
    if sch not in SCHEMES:
        raise ValueError(f"unsupported URI scheme {sch!r} in {s!r} "
                         f"(supported are {', '.join(SCHEMES)} or a local path)")
    rest = s.split("://", 1)[1]
    if sch == "file":
        return Path(rest)
    if not rest.strip("/"):
        raise ValueError(f"{s!r} names no bucket")
    from upath import UPath

    return UPath(f"{sch}://{rest.rstrip('/')}", use_listings_cache=False)


as_path = location  # the dataset readers' name for it (pipeline/datasets: a dataset.root as a pathlib-style object)


# ---------------------------------------------------------------- writing whole files


def _temp_for(loc: Location, is_dir: bool = False) -> Path:
    """A fresh local name to build `loc` in: beside it for a local path (same filesystem, so publishing is an
    os.replace; its parent is created), in the temp dir for a URI (a unique name: two shard dirs may hold files
    of the same name)."""
    if is_local(loc):
        loc = Path(loc)
        loc.parent.mkdir(parents=True, exist_ok=True)
        return loc.with_name(f".{loc.name}.{os.getpid()}{TMP_SUFFIX}")
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=f".{loc.name}.", suffix=TMP_SUFFIX))
    fd, tmp = tempfile.mkstemp(prefix=f".{loc.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


def _remove(path: Path) -> None:
    """A local file or directory, gone; absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put_tree(local: Path, loc: UPath, replace: bool = False) -> None:
    """Upload a local file, or every file under a local dir, to `loc` (one PUT per file). `replace`: objects
    under the dir's prefix that it does not hold are deleted afterwards, so `loc` holds what `local` held."""
    if not local.is_dir():
        loc.fs.put_file(str(local), loc.path)
        return
    new = {f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file()}
    for rel in sorted(new):
        loc.fs.put_file(str(local / rel), f"{loc.path}/{rel}")
    for old in loc.fs.find(loc.path) if replace else ():
        if old[len(loc.path) + 1:] not in new:
            loc.fs.rm_file(old)


def _publish(local: Path, loc: Location) -> None:
    """Move a finished local file or dir to `loc`: os.replace locally (a dir replaces the old one whole, which is
    moved aside to ".<name>.<pid>.old" and removed), an upload for a URI."""
    if not is_local(loc):
        _put_tree(local, loc, replace=True)
        return
    loc = Path(loc)
    if local.is_dir() and loc.exists():
        old = loc.with_name(f".{loc.name}.{os.getpid()}.old")
        os.replace(loc, old)
        os.replace(local, loc)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(local, loc)


@contextlib.contextmanager
def writing(loc: Location, is_dir: bool = False) -> Iterator[Path]:
    """`with writing(loc) as tmp:` build the file (or with `is_dir`, the directory) in the local `tmp`; when the
    block succeeds it replaces `loc` whole (os.replace locally, an upload for a URI), so a reader never sees half
    of it. The temporary is removed in any case (a full disk or a failed upload leaves nothing behind)."""
    loc = location(loc)
    tmp = _temp_for(loc, is_dir)
    try:
        if is_dir:
            _remove(tmp)
            tmp.mkdir()
        yield tmp
        _publish(tmp, loc)
    finally:
        _remove(tmp)


def put_atomic(loc: Location, data: bytes | str) -> None:
    """Write a whole file so that a reader (or a crash) never sees half of it (`writing`): a stats file, a
    summary, a best.pt. On S3 a single PUT is atomic: a reader sees the old object or the new one."""
    with writing(loc) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def sweep_temp(loc: Location) -> list[Path]:
    """Remove the temporary files and dirs that crashed writers (`writing`) left in the local dir `loc`; returns
    them. Only safe while no other process writes there (the shard dir's lock). An object store has none: the
    temporaries of a URI are local to its writer, in the temp dir, and removed on failure."""
    loc = location(loc)
    if not is_local(loc) or not loc.is_dir():
        return []
    found = sorted([*loc.glob(f".*{TMP_SUFFIX}"), *loc.glob(".*.old")])
    for p in found:
        _remove(p)
    return found


@contextlib.contextmanager
def local(loc: Location, download: bool = True, upload: bool = False) -> Iterator[Path]:
    """A real local file (or dir) standing for `loc`, for code that needs one: `loc` itself when it is local;
    for a URI a path in a fresh temp dir, holding a copy of the object when `download` (and it exists), and,
    when `upload`, uploaded to `loc` on leaving (a dir: every file under it, over what is there, as a local
    write in place would be). The upload also happens after an error, as a local write would have left its
    files (a run's log is most wanted then); the temp dir is removed."""
    loc = location(loc)
    if is_local(loc):
        yield loc
        return
    tmp = Path(tempfile.mkdtemp(prefix="densevse-"))
    path = tmp / loc.name
    try:
        if download and loc.is_file():
            loc.fs.get_file(loc.path, str(path))
        yield path
    finally:
        try:
            if upload and path.exists():
                _put_tree(path, loc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- what else differs


class Stamp(NamedTuple):
    size: int
    version: int | str | None  # what changes when the file is rewritten
    kind: str  # "mtime_ns" (a local file) or "etag" (an object): a shard's stats record it as tar_<kind>


def stamp(loc: Location) -> Stamp:
    """(size, version, kind) in one call (one HEAD request for an object); FileNotFoundError when absent."""
    loc = location(loc)
    if is_local(loc):
        st = loc.stat()
        return Stamp(st.st_size, st.st_mtime_ns, "mtime_ns")
    info = loc.fs.info(loc.path)
    if info.get("type") == "directory":
        raise FileNotFoundError(str(loc))
    return Stamp(int(info["size"]), info.get("ETag"), "etag")


def ray_storage(loc: Location) -> dict:
    """Ray Train RunConfig's storage arguments: an absolute local storage_path, or for a URI the path inside its
    bucket with a pyarrow filesystem built from fsspec's (so it reads the same endpoint environment)."""
    loc = location(loc)
    if is_local(loc):
        return {"storage_path": str(loc.resolve())}
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return {"storage_path": loc.path, "storage_filesystem": PyFileSystem(FSSpecHandler(loc.fs))}


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists (put_if without an ETag) or is no longer that version."""


def _s3(loc: UPath):
    """(s3fs filesystem, bucket, key) of an s3:// location; conditional PUTs are S3's."""
    if scheme(loc) != "s3":
        raise NotImplementedError(f"{loc}: conditional writes are implemented for s3:// only")
    bucket, _, key = loc.path.partition("/")
    return loc.fs, bucket, key


def put_if(loc: UPath, data: bytes, etag: str | None = None) -> str:
    """Write the object `loc` only if it is absent (`etag` None: If-None-Match *) or still the version `etag`
    (If-Match): S3's compare-and-swap. Returns the new ETag; PreconditionFailed when another writer got there
    first. Any other failure is raised as it is."""
    fs, bucket, key = _s3(location(loc))
    cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
    except Exception as e:
        if _precondition_failed(e):
            raise PreconditionFailed(f"{loc}: changed by another writer") from e
        raise


def read_versioned(loc: UPath) -> tuple[bytes | None, str | None]:
    """(bytes, ETag) of the object `loc`, or (None, None) when absent. The ETag is read first: a change in
    between makes a later put_if with it fail, never succeed on bytes it did not see."""
    loc = location(loc)
    fs, bucket, key = _s3(loc)
    try:
        etag = fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        return fs.cat_file(loc.path), etag
    except FileNotFoundError:
        return None, None


def _precondition_failed(e: BaseException | None) -> bool:
    """S3's 412 for a conditional PUT (botocore ClientError code PreconditionFailed; s3fs may wrap it)."""
    while e is not None:
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                return True
        if "PreconditionFailed" in str(e) or "(412)" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
