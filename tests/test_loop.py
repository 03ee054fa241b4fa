"""The shared Ray Train loop (pipeline/training/loop.py) with the captioner task: a failed job ends its MLflow
run as FAILED, --resume continues it; and the loop's fault-injection and path helpers. The embedding
task's crash recovery, resume and failed run are in test_train.py."""
from __future__ import annotations

import pytest

from densevse.pipeline.config import load_config
from tests.shard_fixture import write_fixture_shards


def _cfg(tmp_path, *extra):
    shards = tmp_path / "shards"
    if not shards.exists():
        write_fixture_shards(shards, n_train=24, n_val=6, n_test=0, feat_dim=16, per_shard=12)
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"shards.dir={shards}", "ray.num_cpus=2",
                              "train.word_vectors=random", "captioner.hidden_dim=16", "captioner.epochs=1",
                              "mlflow.tracking_uri=sqlite:///mlflow.db", *extra])


def _client_runs(cfg, run_name):
    """The runs named `run_name`, read through the absolute URI: MLflow caches a store per URI string for the
    whole process, so another test's "sqlite:///mlflow.db" (relative, other cwd) would answer for this one."""
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.tracking.server import absolute_uri

    client = MlflowClient(absolute_uri(cfg.mlflow.tracking_uri))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client, client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'")


@pytest.mark.slow
def test_captioner_failed_job_is_failed_in_mlflow_and_resumes(tmp_path, monkeypatch):
    """A crash at epoch 1 with no restarts allowed: the job fails and its MLflow run is FAILED. --resume then
    trains epoch 1 only, from epoch 0's checkpoint, into the same run, which ends FINISHED with each epoch once.
    (One test for both: each Ray Train job costs about a minute on a 2-core machine.)"""
    from densevse.pipeline.training.tasks import train

    monkeypatch.chdir(tmp_path)  # the relative sqlite URI: the workers must log into this same store
    cfg = _cfg(tmp_path, "captioner.epochs=2", "train.max_failures=0")
    monkeypatch.setenv("DENSEVSE_FAIL_AT_EPOCH", "1")
    with pytest.raises(Exception, match="DENSEVSE_FAIL_AT_EPOCH=1"):
        train(cfg, "captioner")
    client, (run,) = _client_runs(cfg, "default-captioner")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    why = f"status {run.info.status}, epochs logged {steps}, tags {sorted(run.data.tags)}"
    assert run.info.status == "FAILED" and run.data.tags["model"] == "mrnn", why
    assert "DENSEVSE_FAIL_AT_EPOCH=1" in run.data.tags["failure"] and steps == [0], why

    monkeypatch.delenv("DENSEVSE_FAIL_AT_EPOCH")  # (the local Ray, started above, still has it in its env)
    s = train(cfg, "captioner", resume=True)  # (RUNNING again while it trains)
    assert [h["epoch"] for h in s["history"]] == [0, 1] and s["best_epoch"] in (0, 1)
    assert s["mlflow_run_id"] == run.info.run_id and int(s["registered_version"]) == 1
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]


def test_fail_at_epoch_must_be_an_epoch(monkeypatch):
    from densevse.pipeline.training.loop import _fail_env

    monkeypatch.delenv("DENSEVSE_FAIL_AT_EPOCH", raising=False)
    assert _fail_env() == {"DENSEVSE_FAIL_AT_EPOCH": ""}  # set, empty: off even where Ray started with it set
    monkeypatch.setenv("DENSEVSE_FAIL_AT_EPOCH", " 2")
    assert _fail_env() == {"DENSEVSE_FAIL_AT_EPOCH": "2"}
    monkeypatch.setenv("DENSEVSE_FAIL_AT_EPOCH", "one")
    with pytest.raises(ValueError, match="DENSEVSE_FAIL_AT_EPOCH='one'"):
        _fail_env()


def test_resume_finds_its_own_tasks_checkpoint(tmp_path):
    """Each task resumes from its own runs only; a resume with nothing to resume from fails before Ray starts."""
    from densevse.pipeline.training.captioner import CaptionerTask
    from densevse.pipeline.training.loop import fit, latest_checkpoint, storage
    from densevse.pipeline.trained import best_path

    import os

    import torch

    cfg = _cfg(tmp_path)
    for run in ("default-hmlstm-20260101-000000", "default-captioner-20260101-000000"):
        (storage(cfg) / run / "checkpoint_000000").mkdir(parents=True)
        torch.save({"epoch": 0}, storage(cfg) / run / "checkpoint_000000" / "model.pt")
    # A newer copy cut short (a worker killed while Ray persisted it) is passed over.
    cut = storage(cfg) / "default-hmlstm-20260101-000000" / "checkpoint_000001" / "model.pt"
    cut.parent.mkdir()
    whole = (storage(cfg) / "default-hmlstm-20260101-000000" / "checkpoint_000000" / "model.pt").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    os.utime(cut, (2e9, 2e9))
    assert latest_checkpoint(cfg).name == "checkpoint_000000"
    assert latest_checkpoint(cfg).parent.name.startswith("default-hmlstm-")
    assert latest_checkpoint(cfg, "captioner").parent.name.startswith("default-captioner-")
    assert best_path(cfg.run.output_dir, CaptionerTask.name) == tmp_path / "run" / "models" / "captioner" / "best.pt"
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint of captioner"):
        fit(_cfg(tmp_path, "run.name=other"), CaptionerTask(cfg), resume=True)


def test_tasks_are_registered_by_name(tmp_path):
    """One registry, one entry point: every embedding model and the captioner by name; an embedding task trains
    train.model (its config, MLflow name and paths), so naming another is a config error before anything runs."""
    from densevse.pipeline.errors import ConfigError
    from densevse.pipeline.training.tasks import TASKS, train

    cfg = _cfg(tmp_path)
    assert TASKS.names() == ["captioner", "dvsa", "hmlstm", "vse"]
    assert (TASKS.get("captioner")(cfg).name, TASKS.get("captioner")(cfg).model_name) == ("captioner", "mrnn")
    assert TASKS.get("hmlstm")(cfg).name == TASKS.get("hmlstm")(cfg).model_name == "hmlstm"
    with pytest.raises(ConfigError, match="set -s train.model=vse"):
        train(cfg, "vse")
    with pytest.raises(KeyError, match="unknown training task 'mrnn'"):
        train(cfg, "mrnn")
