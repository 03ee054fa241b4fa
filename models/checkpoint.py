"""Loading trained checkpoints safely: `torch.load(weights_only=True)` everywhere, so a crafted file (a shared
output dir, a downloaded model, a registry artifact) cannot run code when it is unpickled.

Checkpoints hold tensors and plain Python values (names, vocabularies, history, config). Those written before
models stopped storing their GloVe init in `hparams` also hold a numpy array; numpy's array reconstruction is
allow-listed for that (it builds arrays and runs no code). Anything else is refused with UnsafeCheckpointError.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from densevse.models import restore  # the package's own __init__: runs before this module anyway
from densevse.models.vocab import Vocab


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs code to unpickle: refused, never run."""


class ChecksumMismatch(ValueError):
    """A checkpoint whose bytes are not the ones recorded (by an index, say): refused before unpickling."""


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, core.multiarray.scalar, *dtypes]


def is_complete(path) -> bool:
    """Whether `path` (a local path, or an open binary file such as an object store's) is a whole torch
    checkpoint (a zip archive with its central directory, which is written last): a copy cut short, e.g. a
    worker killed while Ray persisted its checkpoint, is not."""
    import zipfile

    if isinstance(path, (str, Path)):
        return Path(path).is_file() and zipfile.is_zipfile(path)
    try:  # reads only the zip's end record; a file shorter than that is a seek error in fsspec
        return zipfile.is_zipfile(path)
    except ValueError:
        return False


def load_checkpoint(path: str | Path, device="cpu", sha256: str | None = None) -> dict:
    """The checkpoint dict at `path`, loaded with weights_only=True (numpy arrays allowed, code never). With
    `sha256`, the bytes loaded are the bytes checked (read once): ChecksumMismatch when they differ."""
    src = path
    if sha256 is not None:
        data = Path(path).read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise ChecksumMismatch(f"{path} has changed since it was recorded: sha256 {got[:12]}, recorded "
                                   f"{sha256[:12]}; refused")
        src = io.BytesIO(data)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(src, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln.upper()] or [type(e).__name__]
        raise UnsafeCheckpointError(f"refused to load {path}: not a plain checkpoint, unpickling it would run "
                                    f"code ({lines[0][:300]})") from None


def load_model(path: str | Path, device="cpu", sha256: str | None = None):
    """(model, vocab, labels, checkpoint dict) from a model.pt written by training (or its directory); `sha256`:
    as load_checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    ck = load_checkpoint(path, device, sha256)
    return restore(ck, device), Vocab(ck["vocab"]), Vocab(ck["labels"]), ck
