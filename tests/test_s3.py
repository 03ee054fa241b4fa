"""Object storage against a real S3-compatible HTTP server (moto_server on 127.0.0.1, fixture s3_server): shards
written to and read from s3://, the stats object as the finished marker, and (slow) the whole pipeline: preprocess
to S3, train reading from it and checkpointing to it, an MLflow server storing artifacts there, and a resume that
redoes only the shard whose stats object was deleted; and dataset files read from an s3:// dataset.root."""
from __future__ import annotations

import os

import pytest

from densevse.pipeline import storage
from densevse.pipeline.preprocess import shards
from tests.shard_fixture import write_fixture_shards


def _objects(prefix: str) -> dict[str, str]:
    """key -> ETag of every object under s3://bucket/<prefix>, straight from the server (boto3)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def test_shards_on_s3(s3_server, capsys):
    from densevse.pipeline.training.data import iter_samples

    d = "s3://bucket/fixture/shards"
    write_fixture_shards(d, n_train=20, n_val=10, n_test=0, per_shard=10)
    keys = _objects("fixture/shards/")
    assert {"fixture/shards/manifest.parquet", "fixture/shards/train-000000.tar",
            "fixture/shards/train-000001.stats.json"} <= set(keys)
    paths = shards.shard_paths(d, "train")
    assert paths == [f"{d}/train-000000.tar", f"{d}/train-000001.tar"]
    assert len(list(iter_samples(paths))) == 20  # webdataset reads the tars from S3
    from densevse.pipeline.cli.main import main

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

    from densevse.pipeline.config import load_config
    from densevse.pipeline.training.loop import latest_checkpoint, load_dir

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


def _dataset(kind: str, root):
    """A small local dataset of `kind` with one listed-but-missing image; returns its DatasetConfig options."""
    from tests.test_table_inputs import _jpeg, _write_table, write_img2dataset

    if kind == "img2dataset":
        write_img2dataset(root)
        return {}
    (root / "imgs").mkdir(parents=True)
    for i, name in enumerate(("a", "b")):
        (root / "imgs" / f"{name}.jpg").write_bytes(_jpeg(i))
    if kind == "table":  # imgs/a.jpg, imgs/b.jpg and an https URL (not fetched here)
        _write_table(root / "caps.csv", rows=[("imgs/a.jpg", "A dog.", "train", "x"), ("imgs/b.jpg", "A cat.", "", "y"),
                                              ("imgs/gone.jpg", "Missing.", "", "z")])
        return {"table": {"file": "caps.csv", "url_col": "image", "caption_col": "text"}}
    (root / "images").mkdir()
    for name in ("a", "b"):
        (root / "images" / f"{name}.jpg").write_bytes((root / "imgs" / f"{name}.jpg").read_bytes())
    (root / "Flickr8k.token.txt").write_text("".join(f"{n}.jpg#{i}\tPhoto {n}, caption {i} .\n"
                                                     for n in ("a", "b", "gone") for i in range(2)))
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\ngone.jpg\n")
    return {}


@pytest.mark.parametrize("kind", ["flickr8k", "table", "img2dataset"])
def test_dataset_root_in_s3_reads_like_the_local_folder(s3_server, tmp_path, kind):
    """The same dataset folder, local and uploaded to s3://bucket/ds-<kind>: the readers (over a UPath) give the
    same samples with s3:// sources, and ingest reads every image's bytes from the bucket, with the same
    rejections (a missing image, an img2dataset failure) naming the object instead of the file."""
    import json

    from densevse.pipeline.config import DatasetConfig
    from densevse.pipeline.datasets import read_dataset
    from densevse.stages.base import INGEST, empty_row

    local, uri = tmp_path / kind, f"s3://bucket/ds-{kind}"
    opts = _dataset(kind, local)
    fs, path = storage.filesystem(uri)
    fs.put(str(local) + "/", path, recursive=True)

    def samples(root):
        cfg = DatasetConfig(kind=kind, root=root, **opts)
        specs = list(read_dataset(cfg, cfg.root))
        rows = [empty_row(key=s["key"], source=s["source"], captions=json.dumps(s["captions"]),
                          gold=json.dumps(s["gold"])) for s in specs]
        out = INGEST.get("image_caption")().process(rows)
        return specs, {r["key"]: (r["reject"], r["image"], r["captions"]) for r in out}

    local_specs, local_out = samples(local)
    s3_specs, s3_out = samples(uri)
    assert len(local_specs) >= 3 and [s["key"] for s in s3_specs] == [s["key"] for s in local_specs]
    for a, b in zip(local_specs, s3_specs):
        assert b["source"] == a["source"].replace(str(local), uri) and b["source"].startswith(uri + "/")
        assert (b["captions"], b["gold"], b["split"]) == (a["captions"], a["gold"], a["split"])
    assert {k: (r[0].replace(str(local), uri), r[1], r[2]) for k, r in local_out.items()} == s3_out
    ok = [k for k, r in s3_out.items() if not r[0]]
    assert len(ok) >= 2 and all(s3_out[k][1][:2] == b"\xff\xd8" for k in ok)  # the JPEG bytes, from the bucket
    reasons = [r[0] for r in s3_out.values() if r[0]]
    assert reasons and all(uri in r or "img2dataset: HTTP Error 404" in r for r in reasons), reasons


@pytest.mark.slow
def test_pipeline_on_s3(s3_server, stage_models, tmp_path):
    """Preprocess to s3://bucket/run/shards, train 1 epoch from it with Ray Train checkpoints in S3, model
    registered in an MLflow server whose artifacts go to s3://bucket/mlartifacts; then delete one shard's stats
    object and re-run: only that shard is rewritten."""
    import ray
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.config import load_config
    from densevse.pipeline.preprocess.run import preprocess
    from densevse.pipeline.tracking import server
    from densevse.pipeline.training.tasks import train
    from tests.conftest import ROOT, tiny_overrides

    proc, uri = server.start_server(tmp_path / "mlflow", artifacts="s3://bucket/mlartifacts")
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

        summary = train(cfg)
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
        server.stop_server(proc)
        if ray.is_initialized():
            ray.shutdown()


@pytest.mark.slow
def test_preprocess_a_dataset_in_s3(s3_server, stage_models, tmp_path, monkeypatch):
    """`densevse preprocess` with dataset.root=s3://... (Flickr8k layout) and the shards in the same bucket: the
    Ray workers read the images from S3, the manifest names each sample's s3:// source, and the image listed but
    absent is a recorded rejection naming its object."""
    import pyarrow.parquet as pq

    from densevse.pipeline.cli.main import main
    from densevse.pipeline.training.data import iter_samples
    from tests.conftest import ROOT

    _dataset("flickr8k", tmp_path / "f8k")
    fs, path = storage.filesystem("s3://bucket/f8k-data")
    fs.put(str(tmp_path / "f8k") + "/", path, recursive=True)
    over = ["dataset.kind=flickr8k", "dataset.root=s3://bucket/f8k-data", "dataset.splits=[train]",
            "shards.dir=s3://bucket/f8k-run/shards", f"run.output_dir={tmp_path / 'out'}", "shards.samples_per_shard=2",
            "stages.regions.impl=gold_boxes", "stages.regions.params={}", "stages.features.params.input_size=96",
            f"stages.parse.params.model_dir={stage_models[1]}", "ray.num_cpus=2"]
    monkeypatch.chdir(ROOT)  # the stage model path is relative to the repo root
    assert main(["preprocess", "pipeline.yaml", "--quiet", *[a for o in over for a in ("-s", o)]]) == 0
    with storage.open_file("s3://bucket/f8k-run/shards/" + shards.MANIFEST) as f:
        m = {r["source"]: r for r in pq.read_table(f).to_pylist()}
    assert sorted(m) == [f"s3://bucket/f8k-data/images/{n}.jpg" for n in ("a", "b", "gone")]
    assert m["s3://bucket/f8k-data/images/gone.jpg"]["reason"] == \
        "ingest: missing image file s3://bucket/f8k-data/images/gone.jpg"
    assert [m[f"s3://bucket/f8k-data/images/{n}.jpg"]["status"] for n in ("a", "b")] == ["ok", "ok"]
    tars = shards.shard_paths("s3://bucket/f8k-run/shards", "train")
    got = {s["meta"]["source"]: s["jpg"] for s in iter_samples(tars, with_image=True)}
    assert got == {f"s3://bucket/f8k-data/images/{n}.jpg": (tmp_path / "f8k" / "images" / f"{n}.jpg").read_bytes()
                   for n in ("a", "b")}  # original bytes, read from the bucket by the workers
