"""Where a path becomes a filesystem: local paths and object-store URIs (s3://, gs://, file://), in one place.

A location is either a local `Path` (behaves exactly as before: write to a temporary name + os.replace) or a
URI string kept intact (pathlib would collapse `s3://b/k` to `s3:/b/k`). URIs go through fsspec (s3fs, gcsfs);
for S3 a single PUT is atomic, so `put_atomic` is one PUT and a reader sees the old object or the new one.

S3 endpoint and credentials come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), read by botocore, which s3fs uses: nothing S3-specific is in
pipeline.yaml.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO

SCHEMES = ("s3", "gs", "file")
Location = Path | str  # a local Path, or a URI string "scheme://bucket/key"


def scheme(loc: Location) -> str | None:
    """The URI scheme ("s3", "gs", "file"), or None for a local path."""
    s = str(loc)
    return s.split("://", 1)[0].lower() if "://" in s else None


def is_uri(loc: Location) -> bool:
    """True for an object-store URI (file:// counts as local: it is turned into a Path by `location`)."""
    return scheme(loc) not in (None, "file")


def location(value: str | Path) -> Location:
    """Normalise a configured path: object-store URIs stay strings (no trailing '/'), file:// and plain paths
    become Path. ValueError names the scheme when it is not one of SCHEMES."""
    s = str(value)
    sch = scheme(s)
    if sch is None:
        return Path(value)
    if sch not in SCHEMES:
        raise ValueError(f"unsupported URI scheme {sch!r} in {s!r} "
                         f"(supported are {', '.join(SCHEMES)} or a local path)")
    rest = s.split("://", 1)[1]
    if sch == "file":
        return Path(rest)
    if not rest.strip("/"):
        raise ValueError(f"{s!r} names no bucket")
    return f"{sch}://{rest.rstrip('/')}"


def join(loc: Location, *parts: str) -> Location:
    """`loc / part / ...` for either kind (URIs join with '/')."""
    if not is_uri(loc):
        return Path(loc).joinpath(*parts)
    return "/".join([str(loc).rstrip("/"), *(p.strip("/") for p in parts)])


def as_path(loc: Location):
    """A pathlib-style object for a location: `Path` for a local one, universal_pathlib's `UPath` (fsspec
    underneath, no listings cache) for a URI, so that code written against pathlib (`/`, `exists`,
    `read_bytes`, `open`, `glob`: the dataset readers) reads object storage unchanged. str() of a UPath is its
    URI again."""
    if not is_uri(loc):
        return Path(loc)
    from upath import UPath

    return UPath(str(loc), use_listings_cache=False)


def name(loc: Location) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def filesystem(loc: Location):
    """(fsspec filesystem, path inside it) for a location. No listings cache: other processes (Ray workers, a
    re-run) write and delete objects, and a stale listing would hide a finished shard or show a deleted one."""
    import fsspec

    if not is_uri(loc):
        return fsspec.core.url_to_fs(str(loc))
    return fsspec.core.url_to_fs(str(loc), use_listings_cache=False)


def arrow_filesystem(loc: Location):
    """(pyarrow filesystem, path inside it) for a URI, built from fsspec's so that it reads the same environment
    (Ray Train's storage_filesystem)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(loc)
    return PyFileSystem(FSSpecHandler(fs)), path


def glob(loc: Location, pattern: str) -> list[Location]:
    """The files under `loc` matching `pattern` (relative, glob syntax), sorted by path."""
    if not is_uri(loc):
        return sorted(Path(loc).glob(pattern))
    fs, path = filesystem(loc)
    fs.invalidate_cache(path)
    return sorted(f"{scheme(loc)}://{p}" for p in fs.glob(f"{path.rstrip('/')}/{pattern}"))


def open_file(loc: Location, mode: str = "rb") -> IO:
    if not is_uri(loc):
        return open(loc, mode)
    fs, path = filesystem(loc)
    return fs.open(path, mode)


def read_bytes(loc: Location) -> bytes:
    with open_file(loc, "rb") as f:
        return f.read()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def put_atomic(loc: Location, data: bytes | str) -> None:
    """Write a whole object so that a reader (or a crash) never sees half of it: locally a temporary file +
    os.replace, on an object store one PUT (atomic there)."""
    data = data.encode() if isinstance(data, str) else data
    if not is_uri(loc):
        path = Path(loc)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves nothing behind
        return
    fs, path = filesystem(loc)
    fs.pipe_file(path, data)


def upload(local: Path, loc: Location) -> None:
    """Move a finished local file to `loc`: os.replace locally, one upload (atomic on S3) for a URI."""
    if not is_uri(loc):
        os.replace(local, loc)
        return
    fs, path = filesystem(loc)
    fs.put_file(str(local), path)
    os.unlink(local)


def makedirs(loc: Location) -> None:
    """Create a local directory; object stores have no directories (a prefix exists once an object does)."""
    if not is_uri(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)


def exists(loc: Location) -> bool:
    if not is_uri(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return fs.exists(path)


def is_file(loc: Location) -> bool:
    if not is_uri(loc):
        return Path(loc).is_file()
    fs, path = filesystem(loc)
    return fs.isfile(path)


def size(loc: Location) -> int:
    if not is_uri(loc):
        return Path(loc).stat().st_size
    fs, path = filesystem(loc)
    return int(fs.info(path)["size"])


def listdir(loc: Location, suffix: str = "") -> list[Location]:
    """The files directly under `loc` whose name ends with `suffix`, sorted (a fresh LIST of the prefix for a URI:
    no cached listing, so a re-run sees objects deleted since)."""
    if not is_uri(loc):
        return sorted(p for p in Path(loc).glob(f"*{suffix}") if p.is_file())
    fs, path = filesystem(loc)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    sch = scheme(loc)
    return sorted(f"{sch}://{e['name']}" for e in entries if e["type"] == "file" and e["name"].endswith(suffix))


def delete(loc: Location) -> None:
    """Remove a file or object; absent is fine."""
    if not is_uri(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)
