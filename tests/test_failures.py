"""Failures classified: bad input is a recorded rejection of that sample only; a transient failure (memory, GPU,
I/O, a dead Ray worker) is never recorded as one, it is retried and, if it persists, fails the shard's task."""
import errno
import logging
import pickle

import botocore.exceptions as boto
import numpy as np
import pytest
import ray.exceptions
import torch
from s3fs.errors import translate_boto_error

from densevse.pipeline.preprocess import run
from densevse.stages.base import (Reject, ShardOutage, SourceUnavailable, Stage, box_features, check_shard_rejections,
                         empty_row, guarded, is_transient, npy_load, outage_kind)


def _caused(exc: Exception, cause: Exception) -> Exception:
    exc.__cause__ = cause
    return exc


def _s3(code: str, status: int, translate: bool = True) -> Exception:
    """An object store's answer as botocore raises it (ClientError), and as s3fs re-raises that: an OSError,
    PermissionError, FileNotFoundError ... with the ClientError as its cause. A HEAD request's answer has no body:
    its code is the bare status ("400")."""
    error = boto.ClientError({"Error": {"Code": code, "Message": f"{code} from the server"},
                              "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    return translate_boto_error(error) if translate else error


def _while_handling(exc: Exception, context: Exception, suppress: bool = False) -> Exception:
    """exc raised inside `except` of context (s3fs's `raise translate_boto_error(e, set_cause=False)`), or with
    `raise exc from None` when `suppress`."""
    try:
        try:
            raise context
        except type(context):
            if suppress:
                raise exc from None
            raise exc
    except type(exc) as e:
        return e


@pytest.mark.parametrize("exc,transient", [
    (MemoryError(), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory) out of memory"), True),
    (OSError(errno.EIO, "Input/output error"), True),
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (TimeoutError("timed out"), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (ray.exceptions.ActorDiedError(), True),
    (ray.exceptions.WorkerCrashedError(), True),
    (_caused(RuntimeError("stanza failed"), MemoryError()), True),  # an explicit cause counts
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),  # the input file itself
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (OSError("cannot identify image file"), False),  # PIL: no errno, about the bytes
    (RuntimeError("shape mismatch"), False),
    (ValueError("bad box"), False),
    (_caused(Reject("corrupt image"), MemoryError()), False),  # a stage's explicit verdict wins
    # the object store, as botocore / s3fs raise it: the endpoint, the network, throttling, the service, credentials
    (boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:9000/bucket/a.jpg"), True),
    (boto.ConnectTimeoutError(endpoint_url="http://127.0.0.1:9000/"), True),
    (boto.ReadTimeoutError(endpoint_url="http://127.0.0.1:9000/"), True),
    (boto.ConnectionClosedError(endpoint_url="http://127.0.0.1:9000/"), True),
    (boto.NoCredentialsError(), True),
    (boto.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), True),
    (boto.CredentialRetrievalError(provider="sts", error_msg="the role cannot be assumed"), True),
    (_s3("SlowDown", 503), True),  # s3fs: OSError(EBUSY) from ClientError
    (_s3("ServiceUnavailable", 503), True),
    (_s3("InternalError", 500), True),  # s3fs: OSError(EREMOTEIO)
    (_s3("502", 502), True),
    (_s3("RequestTimeout", 400), True),
    (_s3("ThrottlingException", 400, translate=False), True),
    (_s3("ExpiredToken", 400), True),  # s3fs: PermissionError
    (_s3("400", 400), True),  # the same on a HEAD request (no body: a bare status)
    (_s3("TokenRefreshRequired", 400), True),
    (_s3("InvalidAccessKeyId", 403), True),
    (_s3("AccessDenied", 403), True),  # the run's role, not the sample (see TRANSIENT_CODES)
    (_s3("TooManyRequests", 429, translate=False), True),
    (_while_handling(PermissionError("Forbidden"), _s3("403", 403, translate=False)), True),  # via __context__
    (SourceUnavailable("reading s3://bucket/a.jpg: OSError: [Errno 22] Bad Request"), True),
    (_s3("NoSuchKey", 404), False),  # s3fs: FileNotFoundError: the object is missing, the input's fault
    (_s3("404", 404), False),
    (_s3("InvalidArgument", 400), False),
    (_while_handling(ValueError("bad header"), MemoryError(), suppress=True), False),  # `from None`: not a cause
])
def test_classifier(exc, transient):
    assert is_transient(exc) is transient


class _Features(Stage):
    """A box-feature stage on the real box_features frame: row width -> 2 boxes of 3-d features; width 13 poisons
    the extractor, width 99 makes it run out of memory."""
    name = "features"

    def process(self, rows):
        def extract(widths):
            if 13 in widths:
                raise ValueError("poisoned input")
            if 99 in widths:
                raise MemoryError()
            return np.concatenate([np.full((2, 3), w, np.float32) + np.arange(3) for w in widths])

        return box_features(self.name, rows, lambda r: (r["width"], 2), extract)


def _rows(widths, shard="train-000000"):
    return [empty_row(key=f"k{i}", shard=shard, width=w) for i, w in enumerate(widths)]


def test_poisoned_row_rejects_itself_only():
    clean = _Features().process(_rows([1, 2, 3, 4]))
    mixed = _Features().process(_rows([1, 2, 13, 3, 4]))
    assert mixed[2]["reject"].startswith("features: error ValueError: poisoned input")
    assert mixed[2]["feats"] == b""
    rest = mixed[:2] + mixed[3:]
    assert all(r["reject"] == "" for r in rest)
    assert [npy_load(r["feats"]).tolist() for r in rest] == [npy_load(r["feats"]).tolist() for r in clean]


def test_transient_error_in_batch_propagates_without_rejects():
    rows = _rows([1, 99, 2])
    with pytest.raises(MemoryError):
        _Features().process(rows)
    assert all(r["reject"] == "" for r in rows)


class _Flaky(Stage):
    """Adds 1 to each row's width (not idempotent: a retry on already-edited rows would add 2); raises `error`
    on its first `fails` calls for key k1."""
    name = "flaky"

    def __init__(self, error: Exception, fails: int):
        super().__init__()
        self.error, self.fails, self.calls = error, fails, 0

    def process_row(self, row):
        row["width"] += 1
        if row["key"] == "k1":
            self.calls += 1
            if self.calls <= self.fails:
                raise self.error


def test_transient_error_in_a_row_propagates_from_guarded_and_process():
    row = empty_row(key="k1")
    with pytest.raises(MemoryError):
        guarded("flaky", row, _Flaky(MemoryError(), 1).process_row)
    rows = _rows([1, 2, 3])
    with pytest.raises(MemoryError):
        _Flaky(MemoryError(), 1).process(rows)
    assert row["reject"] == "" and all(r["reject"] == "" for r in rows)


def test_bad_input_still_rejected_by_guarded():
    rows = _Flaky(ValueError("bad row"), 1).process(_rows([1, 2, 3]))
    assert [bool(r["reject"]) for r in rows] == [False, True, False]


def test_run_stage_retries_a_transient_error_on_fresh_rows(monkeypatch, caplog):
    monkeypatch.setattr(run, "RETRY_BACKOFF_S", 0)
    stage = _Flaky(MemoryError("cannot allocate"), fails=1)
    with caplog.at_level(logging.WARNING, logger="densevse.preprocess"):
        out = pickle.loads(run._run_stage(stage, pickle.dumps(_rows([10, 20, 30])), batch_size=2))
    assert [(r["key"], r["width"], r["reject"]) for r in out] == [("k0", 11, ""), ("k1", 21, ""), ("k2", 31, "")]
    assert stage.calls == 2 and "stage flaky: shard train-000000: MemoryError: cannot allocate; retry 1/2" in caplog.text


def test_run_stage_fails_the_shard_when_the_error_persists(monkeypatch):
    monkeypatch.setattr(run, "RETRY_BACKOFF_S", 0)
    stage = _Flaky(OSError(errno.EIO, "Input/output error"), fails=10)
    payload = pickle.dumps(_rows([1, 2], shard="val-000007"))
    with pytest.raises(RuntimeError, match=r"^stage flaky: shard val-000007: OSError: \[Errno 5\] Input/output error "
                                           r"\(after 3 tries\)$"):
        run._run_stage(stage, payload, batch_size=4)
    assert stage.calls == run.RETRY_TRIES


def test_run_stage_does_not_retry_a_bug():
    class Broken(Stage):
        name = "broken"
        calls = 0

        def process(self, rows):
            self.calls += 1
            raise KeyError("no such column")

    stage = Broken()
    with pytest.raises(KeyError):
        run._run_stage(stage, pickle.dumps(_rows([1])), batch_size=4)
    assert stage.calls == 1


# ---------------------------------------------------------------- a shard rejected by an outage

TIMEOUT = "ingest: download failed: timed out after 10 s (3 tries)"


def _shard(*reasons: tuple[str, int], ok: int = 0, shard: str = "train-000003") -> list[dict]:
    rows = [empty_row(key=f"k{i}", shard=shard) for i in range(ok)]
    rows += [empty_row(key=f"r{len(rows)}-{i}", shard=shard, reject=reason) for reason, n in reasons for i in range(n)]
    return rows


@pytest.mark.parametrize("reason,kind", [
    (TIMEOUT, "ingest: download failed: timed out"),
    ("ingest: download failed: connection error ([Errno 111] Connection refused) (3 tries)",
     "ingest: download failed: connection error"),
    ("ingest: download failed: connection error (<urlopen error [Errno -3] Temporary failure in name resolution>)",
     "ingest: download failed: connection error"),
    ("ingest: download failed: HTTP 503 Service Unavailable (3 tries)", "ingest: download failed: HTTP 5xx"),
    ("ingest: download failed: HTTP 502 Bad Gateway", "ingest: download failed: HTTP 5xx"),
    ("ingest: download failed: HTTP 429 Too Many Requests (3 tries)", "ingest: download failed: HTTP 429"),
    ("ingest: error EndpointConnectionError: Could not connect to the endpoint URL (fetch.py:120)",
     "ingest: error EndpointConnectionError"),
    ("features: error ValueError: poisoned input (test_failures.py:60)", "features: error ValueError"),
    ("ingest: download failed: HTTP 404 Not Found", None),
    ("ingest: download failed: HTTP 403 Forbidden", None),
    ("ingest: download failed: content type text/html is not an image", None),
    ("ingest: download failed: 5000 bytes, over the cap of 1000 bytes", None),
    ("ingest: download failed: host not found", None),
    ("ingest: download failed: host resolves to a loopback address (deny_private)", None),
    ("ingest: download failed: redirect to a file: URL refused", None),
    ("ingest: download failed in img2dataset: <urlopen error timed out>", None),  # its crawl's record: input now
    ("ingest: missing image file s3://bucket/a.jpg", None),
    ("ingest: not a decodable image", None),
    ("ingest: no usable caption (caption is empty)", None),
])
def test_outage_kinds(reason, kind):
    assert outage_kind(reason) == kind


def test_a_shard_mostly_rejected_by_one_outage_kind_stops_the_run():
    rows = _shard((TIMEOUT, 11), ("ingest: download failed: HTTP 404 Not Found", 2), ok=7)
    with pytest.raises(ShardOutage, match=r"^shard train-000003: 11 of 20 samples rejected as 'ingest: download "
                                          r"failed: timed out' \(e\.g\. 'ingest: download failed: timed out after "
                                          r"10 s \(3 tries\)'\): the network or a service failed, not the input"):
        check_shard_rejections(rows)
    with pytest.raises(ShardOutage, match="12 of 20 samples rejected as 'ingest: download failed: HTTP 5xx'"):
        check_shard_rejections(_shard(("ingest: download failed: HTTP 503 Service Unavailable (3 tries)", 6),
                                      ("ingest: download failed: HTTP 502 Bad Gateway (3 tries)", 6), ok=8))
    with pytest.raises(ShardOutage, match="'ingest: error EndpointConnectionError'"):  # an unclassified exception
        check_shard_rejections(_shard(("ingest: error EndpointConnectionError: Could not connect (x.py:1)", 30)))


@pytest.mark.parametrize("rows", [
    _shard((TIMEOUT, 10), ok=10),  # half, not more
    _shard((TIMEOUT, 9), ok=1),  # most, but under the minimum: a small shard with a few dead hosts
    _shard((TIMEOUT, 2), ok=1),
    _shard(("ingest: download failed: HTTP 404 Not Found", 90), ok=10),  # dead links are input, however many
    _shard(("ingest: download failed in img2dataset: timed out", 100)),
    _shard(("ingest: missing image file s3://bucket/a.jpg", 50)),
    _shard((TIMEOUT, 9), ("ingest: download failed: connection error (reset) (3 tries)", 9), ok=2),  # no one kind
    _shard(ok=40),
    [],
])
def test_input_rejections_and_small_or_mixed_shards_pass(rows):
    check_shard_rejections(rows)


def test_the_thresholds_are_parameters():
    rows = _shard((TIMEOUT, 3), ok=1)
    check_shard_rejections(rows)
    with pytest.raises(ShardOutage, match="3 of 4 samples"):
        check_shard_rejections(rows, min_rejects=3)
    with pytest.raises(ShardOutage, match="11 of 40 samples"):
        check_shard_rejections(_shard((TIMEOUT, 11), ok=29), fraction=0.25)
