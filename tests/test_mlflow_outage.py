"""An MLflow outage does not kill training (pipeline/training/loop.py, pipeline/tracking/runs.py): each epoch is
checkpointed before MLflow is called, a failed log is a warning, the missed epochs are logged (each at its step)
once MLflow answers again; MLflow down before training is a clear error, down after it a summary that says what
MLflow lacks. The slow test stops a real `mlflow server` mid-training and restarts it."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from densevse.pipeline.tracking import registry, runs, server
from densevse.pipeline.config import load_config

HISTORY = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_pairs": 10, "val_rsum": float(e), "note": "x"}
           for e in range(4)]


def _down_uri() -> str:
    return f"http://127.0.0.1:{server.free_port()}"  # nothing listens: connection refused


@pytest.fixture
def no_retries(monkeypatch):
    """One try per call: the fast tests of an MLflow that is down need no backoff (test_bound_* keeps it)."""
    monkeypatch.setattr(runs, "BOUNDED_HTTP", {**runs.BOUNDED_HTTP, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})


def test_unlogged_entries_and_batches():
    assert [h["epoch"] for h in runs.unlogged(HISTORY, [0, 2])] == [1, 3]
    assert runs.unlogged(HISTORY, range(4)) == []
    batches = runs.metric_batches(HISTORY, ts=5, limit=7)  # 3 metrics an entry ("epoch", "note": none)
    assert [[(m.key, m.step) for m in b] for b in batches][0] == [
        ("train_loss", 0), ("train_pairs", 0), ("val_rsum", 0), ("train_loss", 1), ("train_pairs", 1),
        ("val_rsum", 1)]
    assert [len(b) for b in batches] == [6, 6] and all(m.timestamp == 5 for b in batches for m in b)
    assert runs.metric_batches([], ts=5) == []


def test_backfill_logs_what_mlflow_lacks_each_at_its_step(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    runs.log_epoch(uri, run_id, HISTORY[1], step=1)
    assert runs.backfill(uri, run_id, HISTORY) == [0, 2, 3]
    assert runs.backfill(uri, run_id, HISTORY) == []  # nothing twice
    got = [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(got) == [(h["epoch"], h["train_loss"]) for h in HISTORY]


def test_bound_on_a_call_to_an_mlflow_that_is_down(monkeypatch):
    """The real bound (BOUNDED_HTTP: 2 retries, backoff 1): a refused connection fails in about 2 s, not MLflow's
    minutes; the variables are back as they were afterwards, and one set by the user is left alone."""
    import os

    for k in runs.BOUNDED_HTTP:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    t = time.time()
    with pytest.raises(Exception, match="get-history"):
        with runs.bounded():
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
            runs.backfill(_down_uri(), "0" * 32, HISTORY)
    assert time.time() - t < 10
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert not runs.answers(_down_uri(), "0" * 32)


def test_worker_log_is_best_effort(no_retries, caplog):
    """Rank 0's log of an epoch while MLflow is down: a warning, the epochs kept for later, no exception."""
    from densevse.pipeline.training.loop import log_epochs

    with caplog.at_level(logging.WARNING, "densevse.train"):
        assert log_epochs(_down_uri(), "0" * 32, HISTORY[:3], [1, 2], 2) == [1, 2]
    assert "did not take epoch 3's metrics" in caplog.text and "Connection refused" in caplog.text
    assert "steps [1, 2] are logged once it answers again" in caplog.text


def _cfg(tmp_path, uri: str):
    from tests.shard_fixture import write_fixture_shards

    shards = tmp_path / "shards"
    if not shards.exists():
        write_fixture_shards(shards, n_train=24, n_val=6, n_test=0, feat_dim=16, per_shard=12)
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"shards.dir={shards}", "ray.num_cpus=2",
                              "train.word_vectors=random", "train.epochs=4", "train.batch_size=8",
                              "train.hidden_dim=8", "train.embed_dim=8", "train.max_failures=0",
                              f"mlflow.tracking_uri={uri}"])


def test_mlflow_down_before_training_is_a_clear_error(tmp_path, no_retries, caplog):
    """Down at the start: an error that says nothing was trained; a failed job's end_run(FAILED) on an MLflow
    that is down is a warning, never an exception that would hide the job's own error."""
    from densevse.pipeline.training.embedding import EmbeddingTask
    from densevse.pipeline.training.loop import _mark_failed, _mlflow_run

    cfg = _cfg(tmp_path, _down_uri())
    t = time.time()
    with pytest.raises(RuntimeError, match="did not answer before training .*nothing was trained"):
        _mlflow_run(cfg, EmbeddingTask(cfg), None)
    with caplog.at_level(logging.WARNING, "densevse.train"):
        _mark_failed(cfg.mlflow.tracking_uri, "0" * 32, ValueError("the real error"))
    assert "not marked FAILED" in caplog.text and time.time() - t < 10


class _Result:
    """What _end_tracking reads of a Ray Train result: the last checkpoint."""

    def __init__(self, d: Path):
        self.checkpoint, self.dir = self, d

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.dir))


def test_mlflow_still_down_after_training(tmp_path, no_retries, caplog):
    """Down at the end: the job keeps best.pt, the summary lists the steps MLflow lacks (the last checkpoint's
    list) and no registered version; registration is not even tried."""
    import torch

    from densevse.pipeline.training.loop import _end_tracking

    class Task:
        name = "hmlstm"

        def register(self, *a):
            raise AssertionError("registration tried while MLflow is down")

    result = _Result(tmp_path / "checkpoint_000003")
    result.dir.mkdir()
    torch.save({"epoch": 3, "history": HISTORY, "mlflow_unlogged": [2, 3]}, result.dir / "model.pt")
    cfg = _cfg(tmp_path, _down_uri())
    summary = {"history": HISTORY, "early_stop": None}
    with caplog.at_level(logging.WARNING, "densevse.train"):
        _end_tracking(cfg, Task(), "0" * 32, result, summary)
    assert summary["mlflow_missing_epochs"] == [2, 3] and summary["registered_version"] is None
    assert "Connection refused" in summary["mlflow_error"]
    assert "steps [2, 3] are missing" in caplog.text and "best.pt" in caplog.text


@pytest.mark.slow
def test_mlflow_server_stopped_mid_training(tmp_path, monkeypatch):
    """A real `mlflow server` stopped after epoch 2's checkpoint is reported (0-based: after step 0 is logged)
    and restarted (same port, same sqlite store) before step 3 is logged: all 4 epochs train in one attempt
    (train.max_failures=0: any worker failure would fail the job), each checkpoint knows what MLflow lacks, the
    console got the warnings, and after the restart every epoch is in MLflow at its step. The worker waits at
    DENSEVSE_EPOCH_BARRIER while this test stops or starts the server, so the outage hits the same epochs on any
    machine. (Registration is stubbed: its cost and its own tests are elsewhere.)"""
    from mlflow.tracking import MlflowClient

    from densevse.models.checkpoint import load_checkpoint
    from densevse.pipeline.console import Console
    from densevse.pipeline.raylocal import init_ray
    from densevse.pipeline.training.tasks import train
    from densevse.pipeline.training.loop import EPOCH_BARRIER

    t0 = time.time()
    root, port = tmp_path / "mlflow", server.free_port()
    procs = [server.start_server(root, port=port, wait=False)[0]]  # boots while Ray starts
    uri = f"http://127.0.0.1:{port}"
    cfg = _cfg(tmp_path, uri)
    init_ray(cfg)
    server.wait_server(procs[0], uri)
    print(f"ray + mlflow server up: {time.time() - t0:.1f}s")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv(EPOCH_BARRIER, str(barrier))
    registered = []
    monkeypatch.setattr(registry, "finish_run", lambda cfg, run_id, history, best, score=None:
                        registered.append([h["epoch"] for h in history]) or 1)
    errors: list[BaseException] = []

    def conduct():
        """The outage: the server goes at epoch 1's barrier, comes back (answering) at epoch 3's."""
        try:
            for epoch in range(4):
                deadline = time.time() + 600
                while not (barrier / f"reported-{epoch}").exists():
                    if time.time() > deadline:
                        raise TimeoutError(f"epoch {epoch} never reported")
                    time.sleep(0.1)
                if epoch == 1:
                    server.stop_server(procs[0])
                if epoch == 3:
                    procs.append(server.start_server(root, port=port)[0])
                (barrier / f"go-{epoch}").touch()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            for epoch in range(4):
                (barrier / f"go-{epoch}").touch()

    thread = threading.Thread(target=conduct, daemon=True)
    thread.start()
    try:
        with Console(tmp_path / "run.log", "quiet"):
            s = train(cfg)
        thread.join(60)
        assert not errors, errors
        print(f"train with an outage: {time.time() - t0:.1f}s")

        assert [h["epoch"] for h in s["history"]] == [0, 1, 2, 3] and Path(s["best_model"]).is_file()
        assert "mlflow_missing_epochs" not in s and s["registered_version"] == 1 and registered == [[0, 1, 2, 3]]
        ckpts = sorted((tmp_path / "run" / "ray_train").glob("*/checkpoint_*/model.pt"))
        assert len(ckpts) == 4  # one attempt: a restart would have failed the job (max_failures=0)
        assert [load_checkpoint(p)["mlflow_unlogged"] for p in ckpts] == [[0], [1], [1, 2], [1, 2, 3]]
        console = (tmp_path / "run.log").read_text()
        assert f"warning: MLflow at {uri} did not take epoch 2's metrics" in console, console[-3000:]
        assert "did not take epoch 3's metrics" in console and "Connection refused" in console
        assert "MLflow answers again: steps [1, 2] logged late" in console

        client = MlflowClient(uri)
        for key in ("train_loss", "train_pairs", "val_rsum"):
            got = sorted((m.step, m.value) for m in client.get_metric_history(s["mlflow_run_id"], key))
            assert got == [(h["epoch"], float(h[key])) for h in s["history"]], key
    finally:
        for proc in procs:
            server.stop_server(proc)
