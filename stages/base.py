"""The one interface every preprocessing stage implements.

A stage maps a batch of rows to the same rows, enriched. Rows are plain dicts whose values are
Arrow-friendly scalars (str, bytes, int), so they flow through Ray Data unchanged:

    key       stable sample id (no dots: it is the WebDataset key)
    split     train / val / test / ...
    shard     the shard this sample is written to, e.g. "train-000003" (fixed when the run is planned)
    source    where the image came from (path)
    image     JPEG bytes, RGB (filled by ingest)
    width, height
    captions  JSON list of {"index", "text"[, "tree", "phrases"]}: the accepted captions
    caption_rejects  JSON list of {"index", "text", "reason"}
    gold      JSON dict of gold annotations, {} when the dataset has none
              ({"boxes": [[x0,y0,x1,y1], ...], "labels": [...], "trees": {index: tree}, "links": {index: [[node, box], ...]}})
    boxes     .npy bytes, float32 (R, 4) xyxy pixels; row 0 is the whole image (filled by regions)
    feats     .npy bytes, float16 (R, D), one row per box (filled by features)
    reject    "" while the sample is fine; else "<stage>: <reason>", and later stages leave it alone

`Stage.process` is a pure function of its rows (plus the stage's loaded model), so stages test without Ray;
`Stage.__call__` is the Ray Data `map_batches` adapter.
"""
from __future__ import annotations

import errno
import io
import logging
import traceback
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from models.registry import Registry

STAGES: Registry[type["Stage"]] = Registry("stage")
log = logging.getLogger("densevse.stages")

COLUMNS = ("key", "split", "shard", "source", "image", "width", "height", "captions", "caption_rejects",
           "gold", "boxes", "feats", "reject")


class Params(BaseModel):
    """Base for a stage's own parameters (the `params:` block of the stage in pipeline.yaml)."""
    model_config = ConfigDict(extra="forbid")


class Reject(Exception):
    """Raised by a stage for bad input: the sample is recorded as rejected with this reason."""


def empty_row(**fields: Any) -> dict:
    row = {"key": "", "split": "", "shard": "", "source": "", "image": b"", "width": 0, "height": 0,
           "captions": "[]", "caption_rejects": "[]", "gold": "{}", "boxes": b"", "feats": b"", "reject": ""}
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}")
    row.update(fields)
    return row


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


class Stage:
    """Subclass, register with `@STAGES.register("name")`, set `Params`, implement `process_row` or `process`.

    `uses_model = True` makes the orchestrator run the stage as a pool of Ray actors, so the model is loaded
    once per actor (in `__init__`) rather than once per batch. A regions stage with `provides_feats = True` also
    fills `feats`; the features stage is then a `passthrough` one, which the orchestrator leaves out.
    """

    name: ClassVar[str] = "stage"
    Params: ClassVar[type[BaseModel]] = Params
    uses_model: ClassVar[bool] = False
    provides_feats: ClassVar[bool] = False
    passthrough: ClassVar[bool] = False

    def __init__(self, params: BaseModel | dict | None = None):
        self.params = params if isinstance(params, BaseModel) else self.Params.model_validate(params or {})

    def process_row(self, row: dict) -> None:
        """Enrich one accepted row in place; raise Reject(reason) for bad input."""
        raise NotImplementedError

    def process(self, rows: list[dict]) -> list[dict]:
        """Default: row by row. Model stages override this to run one batched forward pass."""
        for row in rows:
            if not row["reject"]:
                guarded(self.name, row, self.process_row)
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch_to_rows(batch)
        return rows_to_batch(self.process(rows))


# ---------------------------------------------------------------- failures: bad input or transient

# OSError numbers that say the machine, disk or network failed, not the file being read (ENOENT, EACCES,
# EISDIR ... and PIL's errno-less "cannot identify image" are about the input: rejections).
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EMFILE, errno.ENFILE,
    errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
    errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH})
# torch / Ray exception classes (matched by name in their MRO, so importing stages needs neither library).
TRANSIENT_TYPES = frozenset({
    "OutOfMemoryError", "AcceleratorError", "CudaError",  # torch: (CUDA) out of memory, any CUDA error
    "RaySystemError", "RayActorError", "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
    "ObjectLostError", "ObjectStoreFullError", "OutOfDiskError", "ObjectFetchTimedOutError"})
TRANSIENT_TEXT = ("out of memory", "cuda error", "_alloc_failed")  # in a RuntimeError's message (torch, cuBLAS)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` says the machine failed (memory, GPU, disk, network, a dead Ray worker), not the input.

    A transient error must never become a recorded rejection: the shard would be finished with a sample that a
    rerun would have kept. Rule, for the exception or any explicit cause (`raise ... from e`): a Reject is bad
    input; MemoryError, ConnectionError and TimeoutError are transient; another OSError is transient only for
    TRANSIENT_ERRNOS; torch / Ray errors whose class is in TRANSIENT_TYPES, and RuntimeErrors whose message
    has TRANSIENT_TEXT, are transient. Everything else (ValueError, a corrupt file ...) is about the input."""
    while exc is not None:
        if isinstance(exc, Reject):
            return False
        if isinstance(exc, (MemoryError, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError):
            if exc.errno in TRANSIENT_ERRNOS:
                return True
        elif {c.__name__ for c in type(exc).__mro__ if c.__module__.split(".")[0] in ("torch", "ray")} & \
                TRANSIENT_TYPES:
            return True
        elif isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in TRANSIENT_TEXT):
            return True
        exc = exc.__cause__
    return False


def guarded(stage: str, row: dict, fn) -> None:
    """Run fn(row); a Reject or another error about the input becomes the row's recorded rejection, never a
    crashed run. A transient error (`is_transient`) is raised on: the orchestrator retries the batch."""
    try:
        fn(row)
    except Reject as e:
        row["reject"] = f"{stage}: {e}"
    except Exception as e:  # noqa: BLE001 - recorded with its traceback's last line, and counted in the run summary
        if is_transient(e):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        row["reject"] = f"{stage}: error {type(e).__name__}: {e} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})"


def box_features(stage: str, rows: list[dict], prepare, extract) -> list[dict]:
    """The frame every region-feature stage shares: `prepare(row)` -> (input, number of boxes) for each live row
    (a failure rejects that row only), one `extract(inputs)` -> (total boxes, D) array for the whole batch,
    and each row's slice stored as float16 `feats`, in box order.

    A batch call that fails on the input is retried row by row, so one poisoned row rejects only itself
    (else it would fail the run, again on every rerun); a transient error is raised on, from either call."""
    ready: list = []
    for row in rows:
        if not row["reject"]:
            guarded(stage, row, lambda r: ready.append((r, *prepare(r))))
    if not ready:
        return rows
    try:
        feats = _feats(extract([x for _, x, _ in ready]), sum(n for _, _, n in ready))
    except Exception as e:  # noqa: BLE001 - isolate the offending row(s)
        if is_transient(e):
            raise
        log.warning("%s: batch of %d failed (%s: %s); retrying row by row", stage, len(ready), type(e).__name__, e)
        for row, x, n in ready:
            guarded(stage, row, lambda r, x=x, n=n: r.update(feats=npy_bytes(_feats(extract([x]), n))))
        return rows
    start = 0
    for row, _, n in ready:
        row["feats"] = npy_bytes(feats[start:start + n])
        start += n
    return rows


def _feats(out, n: int) -> np.ndarray:
    """An extractor's output as float16 (n, D), checked: a wrong row count would shift every later row's slice."""
    feats = np.asarray(out, np.float16)
    if feats.ndim != 2 or len(feats) != n:
        raise ValueError(f"extractor returned features of shape {feats.shape} for {n} boxes")
    return feats


def batch_to_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: _scalar(v[i]) for k, v in batch.items()} for i in range(n)]


def rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        out[k] = col
    return out


def _scalar(v):
    return v.item() if isinstance(v, np.generic) else v

