"""Object storage against a real S3-compatible HTTP server (moto_server on 127.0.0.1, fixture s3_server): shards
written to and read from s3://, the stats object as the finished marker, and (slow) the whole pipeline: preprocess
to S3, train reading from it and checkpointing to it, an MLflow server storing artifacts there, and a resume that
redoes only the shard whose stats object was deleted."""
from __future__ import annotations

import os

import pytest

from pipeline import storage
from pipeline.preprocess import shards
from tests.shard_fixture import write_fixture_shards


def _objects(prefix: str) -> dict[str, str]:
    """key -> ETag of every object under s3://bucket/<prefix>, straight from the server (boto3)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def test_shards_on_s3(s3_server, capsys):
    from pipeline.training.data import iter_samples

    d = "s3://bucket/fixture/shards"
    write_fixture_shards(d, n_train=20, n_val=10, n_test=0, per_shard=10)
    keys = _objects("fixture/shards/")
    assert {"fixture/shards/manifest.parquet", "fixture/shards/train-000000.tar",
            "fixture/shards/train-000001.stats.json"} <= set(keys)
    paths = shards.shard_paths(d, "train")
    assert paths == [f"{d}/train-000000.tar", f"{d}/train-000001.tar"]
    assert len(list(iter_samples(paths))) == 20  # webdataset reads the tars from S3
    from pipeline.cli.main import main

    assert main(["inspect", "--shards", d + "/", "--rejects"]) == 0
    assert "train" in capsys.readouterr().out
    st = shards.read_stats(d, "train-000000")
    assert st["tar_etag"] == keys["fixture/shards/train-000000.tar"]
    planned = {s: shards.keys_sha256([x["key"] for x in shards.read_stats(d, s)["samples"]])
               for s in ("train-000000", "train-000001")}
    assert set(shards.finished_shards(d, planned)) == set(planned)

    storage.delete(shards.stats_path(d, "train-000001"))  # no finished marker: redone on resume
    assert set(shards.finished_shards(d, planned)) == {"train-000000"}
    with pytest.raises(shards.ShardError, match="train-000001.stats.json is missing"):
        shards.shard_paths(d, "train")


def test_changed_object_is_caught(s3_server):
    d = "s3://bucket/changed/shards"
    write_fixture_shards(d, n_train=10, n_val=0, n_test=0, per_shard=10)
    storage.put_atomic(shards.tar_path(d, "train-000000"), b"x" * 10)
    with pytest.raises(shards.ShardError, match="has 10 bytes"):
        shards.shard_paths(d, "train")


def test_latest_checkpoint_in_s3(s3_server):
    """--resume finds the newest whole model.pt under an s3:// train.storage_path (a cut-short copy is passed over)
    and loads it from there."""
    import io

    import torch

    from pipeline.config import load_config
    from pipeline.training.loop import latest_checkpoint, load_dir

    cfg = load_config(None, ["train.storage_path=s3://bucket/ckpt", "train.model=vse"])
    assert latest_checkpoint(cfg, "vse") is None
    for stamp, epoch in (("20260101-000000", 0), ("20260101-000000", 1), ("20260102-000000", 2)):
        buf = io.BytesIO()
        torch.save({"epoch": epoch}, buf)
        storage.put_atomic(f"s3://bucket/ckpt/default-vse-{stamp}/checkpoint_{epoch:06d}/model.pt", buf.getvalue())
    storage.put_atomic("s3://bucket/ckpt/default-vse-20260103-000000/checkpoint_000003/model.pt", b"PK cut short")
    found = latest_checkpoint(cfg, "vse")
    assert found == "s3://bucket/ckpt/default-vse-20260102-000000/checkpoint_000002"
    assert load_dir(found)["epoch"] == 2


@pytest.mark.slow
def test_pipeline_on_s3(s3_server, stage_models, tmp_path):
    """Preprocess to s3://bucket/run/shards, train 1 epoch from it with Ray Train checkpoints in S3, model
    registered in an MLflow server whose artifacts go to s3://bucket/mlartifacts; then delete one shard's stats
    object and re-run: only that shard is rewritten."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.preprocess.run import preprocess
    from pipeline.training import embedding
    from tests.conftest import ROOT, tiny_overrides

    proc, uri = tracking.start_server(tmp_path / "mlflow", artifacts="s3://bucket/mlartifacts")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the stage model paths are relative to the repo root
    try:
        over = [*tiny_overrides(stage_models, tmp_path / "run"), "shards.dir=s3://bucket/run/shards",
                "train.storage_path=s3://bucket/run/ray_train", "train.epochs=1", f"mlflow.tracking_uri={uri}"]
        cfg = load_config(ROOT / "pipeline.yaml", over)
        first = preprocess(cfg, progress=False)
        assert first["splits"]["train"]["n_ok"] > 0
        before = _objects("run/shards/")
        assert "run/shards/summary.json" in before and "run/shards/manifest.parquet" in before

        summary = embedding.train(cfg)
        assert summary["epochs"] == 1
        assert any(k.endswith("/model.pt") for k in _objects("run/ray_train/")), "no checkpoint in S3"
        version = summary["registered_version"]
        assert version
        client = MlflowClient(uri)
        mv = client.get_model_version(cfg.mlflow.registered_model, str(version))
        assert mv.source
        assert _objects("mlartifacts/"), "the registered model's artifacts are not in the bucket"

        victim = "run/shards/train-000001.stats.json"
        storage.delete(f"s3://bucket/{victim}")
        preprocess(cfg, progress=False)
        after = _objects("run/shards/")
        for key in ("train-000000.tar", "train-000000.stats.json", "val-000000.tar"):
            assert after[f"run/shards/{key}"] == before[f"run/shards/{key}"], f"{key} was rewritten"
        assert victim in after
        assert shards.read_stats("s3://bucket/run/shards", "train-000001")["n_planned"] > 0
    finally:
        os.chdir(cwd)
        tracking.stop_server(proc)
        if ray.is_initialized():
            ray.shutdown()
