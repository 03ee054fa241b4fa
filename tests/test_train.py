"""Distributed training end to end: 2 Ray Train workers on CPU (gloo), an injected crash recovered from the
latest checkpoint (DENSEVSE_FAIL_AT_EPOCH), a real MLflow server, the registered model loaded back, --resume,
and a failed job's MLflow run marked FAILED."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

from densevse.pipeline.config import parse_config
from shard_fixture import write_fixture_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from densevse.pipeline.tracking.server import start_server, stop_server

    proc, uri = start_server(tmp_path_factory.mktemp("mlflow"), wait=False)  # boots while Ray starts
    yield proc, uri
    stop_server(proc)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    yield
    ray.shutdown()


def test_two_worker_train_crash_recovery_mlflow_registry_resume(tmp_path, mlflow_server, ray_local, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.evaluation.retrieval import evaluate
    from densevse.models.checkpoint import load_model
    from densevse.models.batch import collate
    from densevse.pipeline.shardset import eval_items, iter_samples
    from densevse.pipeline.shardset import shard_paths
    from densevse.pipeline.tracking.runs import manifest_sha256
    from densevse.pipeline.tracking.server import wait_server
    from densevse.pipeline.raylocal import init_ray
    from densevse.pipeline.training.loop import latest_checkpoint
    from densevse.pipeline.training.tasks import train

    proc, mlflow_server = mlflow_server
    shards = write_fixture_shards(tmp_path / "shards", n_train=36, n_val=10, n_test=10, per_shard=6)
    base = {"run": {"output_dir": str(tmp_path / "run")}, "shards": {"dir": str(shards)},
            "ray": {"num_cpus": 2}, "mlflow": {"tracking_uri": mlflow_server, "registered_model": "test-hmlstm"},
            "train": {"epochs": 2, "batch_size": 16, "hidden_dim": 32, "embed_dim": 32, "num_workers": 2,
                      "max_failures": 1}}
    cfg = parse_config(base)
    t0 = time.time()
    init_ray(cfg)
    wait_server(proc, mlflow_server)
    print(f"ray + mlflow server up: {time.time() - t0:.1f}s")
    monkeypatch.setenv("DENSEVSE_FAIL_AT_EPOCH", "1")  # rank 0 crashes once, at epoch 1's start
    s = train(cfg)
    monkeypatch.delenv("DENSEVSE_FAIL_AT_EPOCH")
    print(f"train: {time.time() - t0:.1f}s")

    # both epochs ran (epoch 1 after the injected crash, restored from epoch 0's checkpoint), all pairs each epoch
    assert [h["epoch"] for h in s["history"]] == [0, 1]
    assert all(h["train_pairs"] == 36 * 5 for h in s["history"])
    assert len(list((tmp_path / "run" / "ray_train").glob("*/checkpoint_*/model.pt"))) == 2
    assert s["history"][-1]["val_rsum"] > 0

    client = MlflowClient(mlflow_server)
    run = client.get_run(s["mlflow_run_id"])
    assert run.data.params["dataset.manifest_sha256"] == manifest_sha256(shards)
    assert run.data.params["train.model"] == "hmlstm"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_t2i_r1")] == [0, 1]
    arts = {a.path for d in ("plots", "config") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/loss_curves.png", "plots/recall_curves.png", "plots/alignment.png", "config/pipeline.yaml"} <= arts

    # the registered model loads with mlflow.pyfunc and embeds images and sentences like the checkpoint does
    mlflow.set_tracking_uri(mlflow_server)
    pyf = mlflow.pyfunc.load_model(f"models:/test-hmlstm/{s['registered_version']}")
    sample = next(iter_samples(shard_paths(shards, "test")))
    tree = sample["meta"]["captions"][0]["tree"]
    out = pyf.predict(pd.DataFrame({"feats": [sample["feats"].tolist(), None], "boxes": [sample["boxes"].tolist(), None],
                                    "tree": [None, json.dumps(tree)]}))
    assert len(out) == 2 and len(out["embedding"][0]) == 32 and len(out["parts"][0]) == len(sample["feats"]) - 1
    model, vocab, labels, _ = load_model(s["best_model"])
    with torch.no_grad():
        b = collate(next(eval_items(shard_paths(shards, "test"), 1, 1)), vocab, labels)
        img, txt = model(b)
    np.testing.assert_allclose(out["embedding"][0], img["image"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["embedding"][1], txt["sentence"][0].numpy(), atol=1e-5)

    metrics = evaluate(cfg)
    assert metrics["n_images"] == 10 and metrics["n_captions"] == 50 and "grounding_acc" in metrics

    # --resume: continue the finished run to 3 epochs; only epoch 2 is trained
    last = latest_checkpoint(cfg)
    cfg3 = parse_config({**base, "train": {**base["train"], "epochs": 3}})
    s3 = train(cfg3, resume=True)
    assert [h["epoch"] for h in s3["history"]] == [0, 1, 2]
    assert s3["mlflow_run_id"] == s["mlflow_run_id"] and latest_checkpoint(cfg) != last
    print(f"total: {time.time() - t0:.1f}s")


def test_failed_job_marks_its_mlflow_run_failed(tmp_path, mlflow_server, ray_local, monkeypatch):
    """A job that fails (an injected crash, no restarts allowed) ends its MLflow run as FAILED, not RUNNING."""
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.tracking.server import wait_server
    from densevse.pipeline.training.tasks import train

    proc, uri = mlflow_server
    shards = write_fixture_shards(tmp_path / "shards", n_train=12, n_val=0, n_test=0, per_shard=6)
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "run"), "name": "failing"}, "shards": {"dir": str(shards)},
                        "ray": {"num_cpus": 2}, "mlflow": {"tracking_uri": uri},
                        "train": {"epochs": 1, "batch_size": 8, "hidden_dim": 8, "embed_dim": 8,
                                  "word_vectors": "random", "max_failures": 0}})
    wait_server(proc, uri)
    monkeypatch.setenv("DENSEVSE_FAIL_AT_EPOCH", "0")
    with pytest.raises(Exception, match="DENSEVSE_FAIL_AT_EPOCH=0"):
        train(cfg)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("densevse").experiment_id],
                                "tags.mlflow.runName = 'failing-hmlstm'")
    assert run.info.status == "FAILED"


def test_two_workers_train_on_whole_image_only_shards(tmp_path, ray_local):
    """One region per image (Flickr8k without a detector): HM-LSTM's region tree gets no gradient there, which
    DDP refused ("parameters that were not used in producing loss") and Ray Train retried until the job
    failed; seen on the whole Flickr8k set. Now two workers train it."""
    from densevse.pipeline.training.tasks import train

    shards = write_fixture_shards(tmp_path / "shards", n_train=24, n_val=6, n_test=0, per_shard=6,
                                  whole_image_only=True)
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "run")}, "shards": {"dir": str(shards)},
                        "ray": {"num_cpus": 2},
                        "train": {"epochs": 1, "batch_size": 8, "hidden_dim": 8, "embed_dim": 8, "num_workers": 2,
                                  "word_vectors": "random", "max_failures": 0}})
    s = train(cfg)
    assert s["model"] == "hmlstm" and [h["epoch"] for h in s["history"]] == [0]  # (max_failures 0: no retry hid it)
