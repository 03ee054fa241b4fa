"""Object storage against a real S3-compatible HTTP server (moto_server on 127.0.0.1, fixture s3_server): shards
written to and read from s3://, the stats object as the finished marker, and (slow) the whole pipeline with
run.output_dir in S3: preprocess to S3, train reading from it and checkpointing to it, best.pt, summaries, the
report and run.log written there, an MLflow server storing artifacts there, and a resume that redoes only the
shard whose stats object was deleted; and dataset files read from an s3:// dataset.root."""
from __future__ import annotations

import pytest

from densevse.pipeline import shardset, storage
from tests.shard_fixture import write_fixture_shards


def _objects(prefix: str) -> dict[str, str]:
    """key -> ETag of every object under s3://bucket/<prefix>, straight from the server (boto3)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def test_shards_on_s3(s3_server, capsys):
    from densevse.pipeline.shardset import iter_samples

    d = "s3://bucket/fixture/shards"
    write_fixture_shards(d, n_train=20, n_val=10, n_test=0, per_shard=10)
    keys = _objects("fixture/shards/")
    assert {"fixture/shards/manifest.parquet", "fixture/shards/train-000000.tar",
            "fixture/shards/train-000001.stats.json"} <= set(keys)
    paths = shardset.shard_paths(d, "train")
    assert [str(p) for p in paths] == [f"{d}/train-000000.tar", f"{d}/train-000001.tar"]
    assert len(list(iter_samples(paths))) == 20  # webdataset reads the tars from S3
    from densevse.pipeline.cli.main import main

    assert main(["inspect", "--shards", d + "/", "--rejects"]) == 0
    assert "train" in capsys.readouterr().out
    st = shardset.read_stats(d, "train-000000")
    assert st["tar_etag"] == keys["fixture/shards/train-000000.tar"]
    planned = {s: shardset.keys_sha256([x["key"] for x in shardset.read_stats(d, s)["samples"]])
               for s in ("train-000000", "train-000001")}
    assert set(shardset.finished_shards(d, planned)) == set(planned)

    shardset.stats_path(d, "train-000001").unlink()  # no finished marker: redone on resume
    assert set(shardset.finished_shards(d, planned)) == {"train-000000"}
    with pytest.raises(shardset.ShardError, match="train-000001.stats.json is missing"):
        shardset.shard_paths(d, "train")


def test_changed_object_is_caught(s3_server):
    d = "s3://bucket/changed/shards"
    write_fixture_shards(d, n_train=10, n_val=0, n_test=0, per_shard=10)
    storage.put_atomic(shardset.tar_path(d, "train-000000"), b"x" * 10)
    with pytest.raises(shardset.ShardError, match="has 10 bytes"):
        shardset.shard_paths(d, "train")


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
    assert str(found) == "s3://bucket/ckpt/default-vse-20260102-000000/checkpoint_000002"
    assert load_dir(found)["epoch"] == 2


def test_index_in_s3_from_a_checkpoint_in_s3(s3_server, tmp_path):
    """`densevse index` of shards in S3 with a best.pt in S3 into an s3:// index dir (an output dir there): built
    locally and uploaded; opened from the bucket with its own checkpoint (read from S3, checked by its sha256),
    a stored sample's vector finds that sample, and its JPEG is a ranged read of its shard object."""
    from densevse.pipeline.search.index import build
    from densevse.pipeline.search.query import Index
    from densevse.pipeline.serving.embedder import load
    from tests.untrusted_fixture import tiny_checkpoint

    shards = write_fixture_shards("s3://bucket/ix/shards", n_train=8, n_val=2, n_test=2, feat_dim=32, per_shard=4)
    best = storage.location("s3://bucket/ix/models/hmlstm/best.pt")
    storage.put_atomic(best, tiny_checkpoint(tmp_path / "best.pt").read_bytes())
    info = build(shards, load(str(best)), "s3://bucket/ix/index", log=lambda m: None)
    assert info["model"]["checkpoint"] == str(best) and info["counts"]["image"] == 12
    assert {"ix/index/index.json", "ix/index/image.faiss", "ix/index/metadata/metadata_0.parquet"} <= set(_objects("ix/"))
    ix = Index.open("s3://bucket/ix/index")
    sample = next(shardset.iter_samples(shardset.shard_paths(shards, "test")))
    vector = ix.embedder.encode_images([(sample, [])])[0]["image"]  # a query's vector, without a parser here
    (score, row), *_ = ix._search("image", vector, 3)  # the FAISS index, read from the bucket
    assert ix.meta[row]["key"] == sample["key"] and score > 0.99
    assert ix.jpeg(row)[:2] == b"\xff\xd8"


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
    bucket = storage.location(uri)
    bucket.fs.put(str(local) + "/", bucket.path, recursive=True)

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
def test_pipeline_on_s3(s3_server, tmp_path, monkeypatch):
    """`densevse run` with run.output_dir=s3://bucket/run (only the generated synthetic set local): the shards,
    Ray Train's checkpoints, best.pt, the train and run summaries, the report and run.log land in the bucket,
    evaluation and the report read best.pt from there, and the model is registered in an MLflow server whose
    artifacts go to s3://bucket/mlartifacts. Then one shard's stats object is deleted and preprocessing re-run:
    only that shard is rewritten."""
    import json

    import ray
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.cli.main import main
    from densevse.pipeline.config import load_config
    from densevse.pipeline.preprocess.run import preprocess
    from densevse.pipeline.tracking import server
    from tests.conftest import ROOT

    proc, uri = server.start_server(tmp_path / "mlflow", artifacts="s3://bucket/mlartifacts")
    monkeypatch.chdir(ROOT)
    over = ["run.output_dir=s3://bucket/run", f"dataset.root={tmp_path / 'dataset'}", "dataset.synthetic.num_images=40",
            "dataset.synthetic.test_images=8", "shards.samples_per_shard=16", "stages.regions.impl=gold_boxes",
            "stages.regions.params={}", "stages.parse.impl=gold_trees", "stages.parse.params={}",
            "stages.features.params.input_size=96", "train.epochs=1", "train.batch_size=16", "train.embed_dim=32",
            "train.hidden_dim=32", "train.word_vectors=random", "ray.num_cpus=2", f"mlflow.tracking_uri={uri}"]
    try:
        assert main(["run", "pipeline.yaml", "--quiet", *[a for o in over for a in ("-s", o)]]) == 0
        before = _objects("run/")
        for key in ("shards/manifest.parquet", "shards/summary.json", "shards/train-000001.tar", "models/hmlstm/best.pt",
                    "train-hmlstm.json", "summary.json", "report/report.html", "report/loss.png", "run.log"):
            assert f"run/{key}" in before, f"no {key} in the bucket"
        assert any(k.startswith("run/ray_train/") and k.endswith("/model.pt") for k in before), "no checkpoint in S3"
        summary = json.loads(storage.location("s3://bucket/run/summary.json").read_text())
        assert summary["evaluate"]["n_images"] == 8 and summary["evaluate"]["epoch"] == 0
        assert summary["paths"]["best model"] == "s3://bucket/run/models/hmlstm/best.pt"
        assert summary["paths"]["log"] == "s3://bucket/run/run.log"
        assert summary["report"] == "s3://bucket/run/report/report.html"
        log = storage.location("s3://bucket/run/run.log").read_text()
        assert log.startswith("\n==== ") and '"step": "preprocess"' in log and '"step": "train"' in log  # the verb's
        version = summary["train"]["registered_version"]
        assert version
        cfg = load_config(ROOT / "pipeline.yaml", over)
        assert MlflowClient(uri).get_model_version(cfg.mlflow.registered_model, str(version)).source
        assert _objects("mlartifacts/"), "the registered model's artifacts are not in the bucket"

        victim = "run/shards/train-000001.stats.json"
        storage.location(f"s3://bucket/{victim}").unlink()
        preprocess(cfg, progress=False)
        after = _objects("run/shards/")
        for key in ("train-000000.tar", "train-000000.stats.json", "val-000000.tar"):
            assert after[f"run/shards/{key}"] == before[f"run/shards/{key}"], f"{key} was rewritten"
        assert victim in after
        assert shardset.read_stats("s3://bucket/run/shards", "train-000001")["n_planned"] > 0
    finally:
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
    from densevse.pipeline.shardset import iter_samples
    from tests.conftest import ROOT

    _dataset("flickr8k", tmp_path / "f8k")
    data = storage.location("s3://bucket/f8k-data")
    data.fs.put(str(tmp_path / "f8k") + "/", data.path, recursive=True)
    over = ["dataset.kind=flickr8k", "dataset.root=s3://bucket/f8k-data", "dataset.splits=[train]",
            "shards.dir=s3://bucket/f8k-run/shards", f"run.output_dir={tmp_path / 'out'}", "shards.samples_per_shard=2",
            "stages.regions.impl=gold_boxes", "stages.regions.params={}", "stages.features.params.input_size=96",
            f"stages.parse.params.model_dir={stage_models[1]}", "ray.num_cpus=2"]
    monkeypatch.chdir(ROOT)  # the stage model path is relative to the repo root
    assert main(["preprocess", "pipeline.yaml", "--quiet", *[a for o in over for a in ("-s", o)]]) == 0
    with storage.location("s3://bucket/f8k-run/shards/" + shardset.MANIFEST).open("rb") as f:
        m = {r["source"]: r for r in pq.read_table(f).to_pylist()}
    assert sorted(m) == [f"s3://bucket/f8k-data/images/{n}.jpg" for n in ("a", "b", "gone")]
    assert m["s3://bucket/f8k-data/images/gone.jpg"]["reason"] == \
        "ingest: missing image file s3://bucket/f8k-data/images/gone.jpg"
    assert [m[f"s3://bucket/f8k-data/images/{n}.jpg"]["status"] for n in ("a", "b")] == ["ok", "ok"]
    tars = shardset.shard_paths("s3://bucket/f8k-run/shards", "train")
    got = {s["meta"]["source"]: s["jpg"] for s in iter_samples(tars, with_image=True)}
    assert got == {f"s3://bucket/f8k-data/images/{n}.jpg": (tmp_path / "f8k" / "images" / f"{n}.jpg").read_bytes()
                   for n in ("a", "b")}  # original bytes, read from the bucket by the workers
