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
import re
import traceback
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from densevse.models.registry import Registry

# One registry per step, as detectron2 keeps one per kind: a step's `impl` is looked up in its own registry only,
# so a regions impl named as the parse stage fails validation instead of running in the wrong place.
INGEST: Registry[type["Stage"]] = Registry("ingest stage")
REGIONS: Registry[type["Stage"]] = Registry("regions stage")
FEATURES: Registry[type["Stage"]] = Registry("features stage")
PARSE: Registry[type["Stage"]] = Registry("parse stage")
STEPS: dict[str, Registry[type["Stage"]]] = {"ingest": INGEST, "regions": REGIONS, "features": FEATURES,
                                             "parse": PARSE}  # step (the config's stages.<step>) -> registry
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
    """Subclass, register in its step's registry (`@REGIONS.register("name")`), set `name` to that step, set
    `Params`, implement `process_row` or `process`.

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

class SourceUnavailable(Exception):
    """A sample's source could not be read for a reason that is not the source's own (the object store down or
    throttling, credentials expired or refused): never a rejection (`is_transient`), so the shard's task fails
    and a rerun redoes it, instead of finishing it with every sample rejected."""


# OSError numbers that say the machine, disk or network failed, not the file being read (ENOENT, EACCES,
# EISDIR ... and PIL's errno-less "cannot identify image" are about the input: rejections). EREMOTEIO and EBUSY
# are what s3fs makes of an object store's InternalError and SlowDown / ServiceUnavailable.
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EMFILE, errno.ENFILE,
    errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
    errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EREMOTEIO,
    errno.EBUSY})
# Exception classes of these libraries are matched by name anywhere in their MRO, so importing stages needs none
# of them.
TRANSIENT_LIBS = ("torch", "ray", "botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "aiohttp", "requests",
                  "google", "gcsfs")
TRANSIENT_TYPES = frozenset({
    "OutOfMemoryError", "AcceleratorError", "CudaError",  # torch: (CUDA) out of memory, any CUDA error
    "RaySystemError", "RayActorError", "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
    "ObjectLostError", "ObjectStoreFullError", "OutOfDiskError", "ObjectFetchTimedOutError",
    # the network to an object store (botocore's ConnectionError covers EndpointConnectionError,
    # ConnectTimeoutError, ProxyConnectionError, SSLError; HTTPClientError covers ReadTimeoutError,
    # ConnectionClosedError, ResponseStreamingError), and urllib3 / requests / aiohttp / fsspec timeouts and drops
    "ConnectionError", "HTTPClientError", "IncompleteReadError", "ReadTimeoutError", "ConnectTimeoutError",
    "NewConnectionError", "ProtocolError", "MaxRetryError", "ProxyError", "Timeout", "ClientConnectionError",
    "ClientPayloadError", "FSTimeoutError", "TransportError",
    # credentials and client configuration: the run's environment, the same for every sample
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "TokenRetrievalError",
    "SSOError", "RefreshWithMFAUnsupportedError", "ProfileNotFound", "NoRegionError", "RefreshError",
    "DefaultCredentialsError"})
# Error codes of an object store's answer (botocore's ClientError) that say the service or the run's credentials
# failed. AccessDenied is among them: a role that may not read the dataset's objects is the operator's to fix,
# and S3 says 403 for a key the role may not list even when it is only missing; rejecting would finish every
# shard with every sample rejected. Any HTTP status >= 500, 429, 401 or 403 counts too, and a bare "400": a HEAD
# request's answer has no body, so S3's ExpiredToken (400) reaches botocore as the code "400".
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "ProvisionedThroughputExceededException",
    "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidToken", "InvalidAccessKeyId",
    "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch", "RequestTimeTooSkewed",
    "RequestExpired", "AccessDenied", "AccountProblem", "AllAccessDisabled", "InvalidSecurity", "NotSignedUp",
    "AuthFailure", "400"})
TRANSIENT_TEXT = ("out of memory", "cuda error", "_alloc_failed")  # in a RuntimeError's message (torch, cuBLAS)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` says the machine or its environment failed (memory, GPU, disk, network, the object store,
    credentials, a dead Ray worker), not the input.

    Such an error must never become a recorded rejection: the shard would be finished with samples that a rerun
    would have kept. Rule, for the exception or the one it was raised from or while handling (`__cause__`, else
    `__context__`; s3fs re-raises an object store's error as OSError, PermissionError ... that way): a Reject is
    bad input; SourceUnavailable, MemoryError, ConnectionError and TimeoutError are transient; another OSError is
    transient only for TRANSIENT_ERRNOS; a class of TRANSIENT_LIBS named in TRANSIENT_TYPES, an object store's
    ClientError with a code in TRANSIENT_CODES or a failed-service HTTP status (see there), and RuntimeErrors
    whose message has TRANSIENT_TEXT are transient. Everything else (ValueError, a corrupt file, a missing
    object: NoSuchKey / 404) is about the input."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Reject):
            return False
        if isinstance(exc, (SourceUnavailable, MemoryError, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        lib = {c.__name__ for c in type(exc).__mro__ if c.__module__.split(".")[0] in TRANSIENT_LIBS}
        if lib & TRANSIENT_TYPES or ("ClientError" in lib and _failed_service(getattr(exc, "response", None))):
            return True
        if isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in TRANSIENT_TEXT):
            return True
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return False


def _failed_service(response) -> bool:
    """A botocore ClientError's `response`: does it say the service or the credentials failed (TRANSIENT_CODES)?"""
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return (str(response.get("Error", {}).get("Code")) in TRANSIENT_CODES or status >= 500
            or status in (401, 403, 429))


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


class ShardOutage(RuntimeError):
    """Most of a shard's samples were rejected for one reason that says the network or a service failed, not the
    input (`check_shard_rejections`): the shard must not be written (a resume would skip it)."""


# A rejection reason "<stage>: <why>" whose <why> says the environment failed rather than the input: a download
# that could not connect, timed out or met a failing server (5xx, 429), and `guarded`'s "error <Type>" for an
# exception no stage classified (a bug or an unforeseen failure: it says nothing about the sample). Each match
# is one kind ("ingest: download failed: HTTP 5xx"). Everything else is input: a missing or undecodable file,
# a caption problem, HTTP 404 / 403 / 410, an HTML page, over the cap, a host not found, img2dataset's own
# failures ("download failed in img2dataset: ...", recorded when it crawled; a rerun cannot change them).
_OUTAGE_REASON = re.compile(r"^(?P<stage>\w+): (?P<why>download failed: (?:connection error|timed out|"
                            r"HTTP (?:5\d\d|429)\b)|error \w+)")


def outage_kind(reason: str) -> str | None:
    """The non-input kind of a rejection reason (see _OUTAGE_REASON), e.g. "ingest: download failed: timed out"
    ("HTTP 5xx" for any 5xx status), or None when the reason is about the input."""
    m = _OUTAGE_REASON.match(reason)
    if not m:
        return None
    why = m["why"]
    return f"{m['stage']}: {why[:-2] + 'xx' if why.startswith('download failed: HTTP 5') else why}"


# A shard stops the run when more than OUTAGE_FRACTION of its samples are rejected with one non-input kind, and
# at least OUTAGE_MIN_REJECTS of them: an outage (the network, DNS, an endpoint) rejects nearly every sample the
# same way, while dead links in a web dataset are mostly 404s and unreachable hosts spread over a few kinds, far
# under half; the minimum keeps a small shard (3 samples, 2 dead links) from stopping a run.
OUTAGE_FRACTION = 0.5
OUTAGE_MIN_REJECTS = 10


def check_shard_rejections(rows: list[dict], min_rejects: int = OUTAGE_MIN_REJECTS,
                           fraction: float = OUTAGE_FRACTION) -> None:
    """Raise ShardOutage when more than `fraction` of one shard's `rows`, and at least `min_rejects`, are rejected
    with one non-input kind (`outage_kind`): the message names the shard, the kind, the count and an example
    reason. Called before the shard is written, so an outage that each sample survived only as a "rejection"
    (a per-URL download failure is one, rightly) fails the run instead of finishing the shard."""
    kinds: dict[str, list[str]] = {}
    for row in rows:
        kind = row["reject"] and outage_kind(row["reject"])
        if kind:
            kinds.setdefault(kind, []).append(row["reject"])
    if not kinds:
        return
    kind, reasons = max(kinds.items(), key=lambda kv: len(kv[1]))
    if len(reasons) >= min_rejects and len(reasons) > fraction * len(rows):
        raise ShardOutage(f"shard {rows[0]['shard']}: {len(reasons)} of {len(rows)} samples rejected as "
                          f"'{kind}' (e.g. '{reasons[0]}'): the network or a service failed, not the input; the "
                          f"shard is not written, so a rerun redoes it once that is fixed")


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

