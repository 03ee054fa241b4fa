"""Stage model files travel with the run, so every node runs exactly the models the driver checked.

A stage's Params name its model files in `model_paths` (field names: a trained detector dir, a weights file,
a Stanza model dir ...). The driver packs the local files those fields point at into one tar (in memory; it
goes through Ray's object store), and each actor unpacks it into a fresh local directory and points the fields
there. Nothing has to be shared between nodes or pre-installed on them, and a node's stale copy at the same
path is never used. Model-zoo names and URLs are not local files and are left as they are (Detectron2
fetches those itself).
"""
from __future__ import annotations

import io
import logging
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger("densevse.ship")
WARN_BYTES = 512 << 20  # models this large go through the object store for every run: say so


def local_model_paths(params) -> dict[str, Path]:
    """The params' model fields that name an existing local file or directory."""
    out = {}
    for field in getattr(params, "model_paths", ()):
        value = getattr(params, field, None)
        if isinstance(value, str) and "://" not in value and Path(value).expanduser().exists():
            out[field] = Path(value).expanduser()
    return out


def pack(params) -> bytes | None:
    """One tar of every local model path of `params` (member names `<field>/...`), or None when there is none."""
    paths = local_model_paths(params)
    if not paths:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for field, path in paths.items():
            tar.add(path, arcname=f"{field}/{path.name}")
    data = buf.getvalue()
    if len(data) > WARN_BYTES:
        log.warning("shipping %.0f MiB of stage models (%s) to every actor", len(data) / 2**20, sorted(paths))
    return data


def unpack(params, data: bytes | None, dest: str | Path | None = None):
    """A copy of `params` whose model fields point at the files unpacked from `pack`'s tar under `dest` (a new
    temporary directory by default). Unchanged when nothing was shipped."""
    if not data:
        return params
    dest = Path(dest or tempfile.mkdtemp(prefix="densevse-models-"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")  # refuses absolute paths, `..` and links out of dest
        names = {m.name.split("/", 1)[0]: m.name.split("/")[1] for m in tar.getmembers() if "/" in m.name}
    return params.model_copy(update={f: str(dest / f / base) for f, base in names.items()})
