"""Failures classified: bad input is a recorded rejection of that sample only; a transient failure (memory, GPU,
I/O, a dead Ray worker) is never recorded as one, it is retried and, if it persists, fails the shard's task."""
import errno
import logging
import pickle

import numpy as np
import pytest
import ray.exceptions
import torch

from pipeline.preprocess import run
from stages.base import Reject, Stage, box_features, empty_row, guarded, is_transient, npy_load


def _caused(exc: Exception, cause: Exception) -> Exception:
    exc.__cause__ = cause
    return exc


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
