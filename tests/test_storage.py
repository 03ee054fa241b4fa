"""pipeline/storage.py on local paths and URI strings, and config fields that take either (no server needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from densevse.pipeline import storage
from densevse.pipeline.config import load_config
from densevse.pipeline.errors import ConfigError


def test_location_keeps_uris_and_makes_paths():
    assert storage.location("s3://bucket/run/shards/") == "s3://bucket/run/shards"
    assert storage.location("GS://b/x") == "gs://b/x" and storage.is_uri("GS://b/x")  # scheme lower-cased
    assert storage.location("file:///tmp/x") == Path("/tmp/x")
    assert storage.location("runs/a") == Path("runs/a")
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        storage.location("ftp://host/x")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.location("s3://")


def test_join_and_name():
    assert storage.join("s3://b/run", "shards", "x.tar") == "s3://b/run/shards/x.tar"
    assert storage.join(Path("/r"), "shards") == Path("/r/shards")
    assert storage.name("s3://b/run/train-000000.tar") == "train-000000.tar"


def test_local_operations(tmp_path):
    p = tmp_path / "a.stats.json"
    storage.put_atomic(p, "{}")
    assert storage.read_text(p) == "{}" and storage.is_file(p) and storage.size(p) == 2
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left
    (tmp_path / "b.tar").write_bytes(b"x")
    assert storage.listdir(tmp_path, ".json") == [p]
    storage.delete(p)
    storage.delete(p)  # absent is fine
    assert not storage.exists(p)


def test_config_takes_uris_and_names_the_bad_key():
    cfg = load_config(None, ["shards.dir=s3://bucket/run/shards/", "train.storage_path=s3://bucket/run/ray"])
    assert cfg.shard_dir == "s3://bucket/run/shards" and cfg.train.storage_path == "s3://bucket/run/ray"
    with pytest.raises(ConfigError, match=r"run\.output_dir.*must be a local path"):
        load_config(None, ["run.output_dir=s3://bucket/run"])
    with pytest.raises(ConfigError, match=r"dataset\.root.*must be a local path"):  # the generated synthetic set
        load_config(None, ["dataset.root=s3://bucket/data"])
    real = load_config(None, ["dataset.kind=flickr8k", "dataset.root=s3://bucket/data/"])
    assert real.dataset_root == "s3://bucket/data"  # read through fsspec (tests/test_s3.py)
    assert load_config(None, ["run.output_dir=runs/x"]).shard_dir == Path("runs/x/shards")
    with pytest.raises(ConfigError, match=r"shards\.dir.*unsupported URI scheme 'ftp'"):
        load_config(None, ["shards.dir=ftp://host/x"])
    with pytest.raises(ConfigError, match=r"dataset\.root.*unsupported URI scheme 'http'"):
        load_config(None, ["dataset.root=http://host/x"])
