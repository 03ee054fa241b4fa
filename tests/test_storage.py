"""pipeline/storage.py: one location type for local paths and object-store URIs, and the few operations that
differ between them, each run on both kinds (a local dir and a real S3 server, moto); config fields that take
either."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from densevse.pipeline import storage
from densevse.pipeline.config import load_config
from densevse.pipeline.errors import ConfigError


def test_location_makes_paths_and_upaths():
    s3 = storage.location("s3://bucket/run/shards/")
    assert str(s3) == "s3://bucket/run/shards" and not storage.is_local(s3) and not isinstance(s3, Path)
    assert str(storage.location("GS://b/x")) == "gs://b/x"  # scheme lower-cased
    assert storage.location("file:///tmp/x") == Path("/tmp/x") and storage.is_local("file:///tmp/x")
    assert storage.location("runs/a") == Path("runs/a")
    assert str(storage.location(s3)) == str(s3) and storage.location(Path("a")) == Path("a")  # idempotent
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        storage.location("ftp://host/x")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.location("s3://")


def test_locations_join_and_name_alike():
    run = storage.location("s3://b/run")
    assert str(run / "shards" / "x.tar") == "s3://b/run/shards/x.tar" and (run / "x.tar").name == "x.tar"
    assert str((run / "shards").parent) == "s3://b/run" and (run / "shards").resolve() == run / "shards"
    assert storage.location(Path("/r")) / "shards" == Path("/r/shards")


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh dir as a location: a local one, or a prefix of the moto server's bucket."""
    if request.param == "local":
        return storage.location(tmp_path / "d")
    request.getfixturevalue("s3_server")
    return storage.location(f"s3://bucket/storage-{uuid.uuid4().hex[:8]}")


def test_files_read_and_write_the_same_on_both_kinds(where):
    p = where / "a.stats.json"
    storage.put_atomic(p, "{}")
    assert p.read_text() == "{}" and p.is_file() and p.stat().st_size == 2 and where.is_dir()
    storage.put_atomic(where / "b.tar", b"x")
    assert [q.name for q in sorted(where.glob("*.json"))] == ["a.stats.json"]
    assert sorted(q.name for q in where.iterdir()) == ["a.stats.json", "b.tar"]  # no temporary file left
    p.unlink()
    p.unlink(missing_ok=True)  # absent is fine
    assert not p.exists()


def test_writing_publishes_whole_or_not_at_all(where):
    f = where / "manifest.parquet"
    storage.put_atomic(f, b"old")
    with pytest.raises(RuntimeError), storage.writing(f) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("a full disk")
    assert f.read_bytes() == b"old" and [q.name for q in where.iterdir()] == ["manifest.parquet"]
    with storage.writing(f) as tmp:
        tmp.write_bytes(b"new")
    assert f.read_bytes() == b"new"
    plan = where / "plan"
    for parts in (["part-0", "part-1"], ["part-0"]):  # a dir is replaced whole: a stale part is gone
        with storage.writing(plan, is_dir=True) as tmp:
            for name in parts:
                (tmp / name).write_text(name)
        assert sorted(q.name for q in plan.iterdir()) == parts
    assert sorted(q.name for q in where.iterdir()) == ["manifest.parquet", "plan"]


def test_stamp_is_mtime_or_etag_and_moves_on_rewrite(where):
    f = where / "x.tar"
    with pytest.raises(FileNotFoundError):
        storage.stamp(f)
    storage.put_atomic(f, b"one")
    first = storage.stamp(f)
    assert first.size == 3 and first.kind == ("mtime_ns" if storage.is_local(f) else "etag")
    assert storage.stamp(f) == first
    time.sleep(0.02)
    storage.put_atomic(f, b"two")
    assert storage.stamp(f).version != first.version


def test_local_copies_read_and_upload_back(where):
    log = where / "run.log"
    storage.put_atomic(log, "a\n")
    with storage.local(log, upload=True) as p:
        assert isinstance(p, Path) and p.read_text() == "a\n" and (p == log) == storage.is_local(log)
        with open(p, "a") as f:
            f.write("b\n")
    assert log.read_text() == "a\nb\n"
    with pytest.raises(RuntimeError), storage.local(log, upload=True) as p:
        p.write_text("c\n")
        raise RuntimeError("the verb failed")
    assert log.read_text() == "c\n"  # uploaded after an error too: a failed run's log is the one wanted
    with storage.local(where / "report", download=False, upload=True) as d:  # a dir, built locally
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.html").write_text("<html>")
    assert (where / "report" / "report.html").read_text() == "<html>"


def test_ray_storage_takes_an_absolute_path_or_a_filesystem(where, tmp_path):
    args = storage.ray_storage(where)
    if storage.is_local(where):
        assert args == {"storage_path": str(where.resolve())}
        return
    storage.put_atomic(where / "ckpt", b"weights")
    assert args["storage_path"] == where.path
    with args["storage_filesystem"].open_input_file(f"{where.path}/ckpt") as f:
        assert f.read() == b"weights"


def test_conditional_puts_are_compare_and_swap(s3_server):
    lease = storage.location(f"s3://bucket/lease-{uuid.uuid4().hex[:8]}/.lock")
    assert storage.read_versioned(lease) == (None, None)
    etag = storage.put_if(lease, b"A")
    with pytest.raises(storage.PreconditionFailed):
        storage.put_if(lease, b"B")  # taken
    renewed = storage.put_if(lease, b"A2", etag)
    with pytest.raises(storage.PreconditionFailed):
        storage.put_if(lease, b"B", etag)  # a stale version
    assert storage.read_versioned(lease) == (b"A2", renewed)


def test_sweep_temp_is_local_only(tmp_path):
    (tmp_path / ".x.tar.42.tmp").write_bytes(b"x")
    assert [p.name for p in storage.sweep_temp(tmp_path)] == [".x.tar.42.tmp"] and not os.listdir(tmp_path)
    assert storage.sweep_temp("s3://bucket/nothing") == []


def test_config_takes_uris_and_names_the_bad_key():
    cfg = load_config(None, ["shards.dir=s3://bucket/run/shards/", "train.storage_path=s3://bucket/run/ray"])
    assert str(cfg.shard_dir) == "s3://bucket/run/shards" and str(cfg.train.storage_path) == "s3://bucket/run/ray"
    assert cfg.model_dump(mode="json")["shards"]["dir"] == "s3://bucket/run/shards"  # as written in checkpoints
    out = load_config(None, ["run.output_dir=s3://bucket/run", "dataset.root=data/synthetic"])
    assert str(out.shard_dir) == "s3://bucket/run/shards" and out.dataset_root == Path("data/synthetic")
    with pytest.raises(ConfigError, match=r"dataset\.root: the synthetic set is generated with local file I/O, "
                                          r"so with run\.output_dir s3://bucket/run"):
        load_config(None, ["run.output_dir=s3://bucket/run"])
    with pytest.raises(ConfigError, match=r"dataset\.root.*must be a local path"):  # the generated synthetic set
        load_config(None, ["dataset.root=s3://bucket/data"])
    real = load_config(None, ["dataset.kind=flickr8k", "dataset.root=s3://bucket/data/"])
    assert str(real.dataset_root) == "s3://bucket/data"  # read through fsspec (tests/test_s3.py)
    assert load_config(None, ["run.output_dir=runs/x"]).shard_dir == Path("runs/x/shards")
    with pytest.raises(ConfigError, match=r"shards\.dir.*unsupported URI scheme 'ftp'"):
        load_config(None, ["shards.dir=ftp://host/x"])
    with pytest.raises(ConfigError, match=r"dataset\.root.*unsupported URI scheme 'http'"):
        load_config(None, ["dataset.root=http://host/x"])
