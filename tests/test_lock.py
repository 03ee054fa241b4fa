"""Two runs never mix: one preprocessing run per shard dir (a real second process holds the lock, locally and as
an S3 lease on a real moto server), the manifest's one config, and no temporary file left behind."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from densevse.pipeline import shardset, storage
from densevse.pipeline.config import load_config
from densevse.pipeline.preprocess.lock import LOCK_NAME, LockHeld, ShardDirLock
from shard_fixture import COLORS, SHAPES, make_row, write_fixture_shards

CODES = {w: np.zeros(16) for w in (*COLORS, *SHAPES)}

HOLD = """
import sys, time
from densevse.pipeline.preprocess.lock import ShardDirLock
with ShardDirLock(sys.argv[1], run="holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(shard_dir, seconds=60):
    """A real second process holding the shard dir's lock; returns it once it holds it."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(shard_dir), str(seconds)], stdout=subprocess.PIPE,
                         text=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_a_locked_shard_dir_fails_at_once_naming_the_holder(tmp_path):
    from densevse.pipeline.preprocess.run import preprocess

    cfg = load_config("pipeline.yaml", [f"run.output_dir={tmp_path}", "dataset.synthetic.num_images=12",
                                        "dataset.synthetic.test_images=4"])
    cfg.shard_dir.mkdir(parents=True)
    holder = _holder(cfg.shard_dir)
    try:
        t = time.time()
        with pytest.raises(LockHeld, match=rf"holds this shard dir: run 'holder', pid {holder.pid} on "):
            preprocess(cfg, progress=False)
        assert time.time() - t < 10  # before any plan or model work
        assert not (cfg.shard_dir / "plan").exists()
    finally:
        holder.kill()
        holder.wait()
    with ShardDirLock(cfg.shard_dir, run="next"):  # a dead holder's flock is gone with it: no stale lock
        rec = json.loads((cfg.shard_dir / LOCK_NAME).read_text())
        assert rec["run"] == "next" and rec["pid"] == os.getpid()


def test_s3_lease_refuses_a_second_run_and_expires_after_a_crash(s3_server):
    d = "s3://bucket/locked/shards"
    a = ShardDirLock(d, run="A", ttl_s=4)
    a.acquire()
    with pytest.raises(LockHeld, match="run 'A'"):
        ShardDirLock(d, run="B", ttl_s=4).acquire()
    time.sleep(2.5)  # A's heartbeat renews its lease (every ttl / 4) while it runs
    with pytest.raises(LockHeld, match="run 'A'"):
        ShardDirLock(d, run="B", ttl_s=4).acquire()
    a._stop.set()  # A "crashes": no more renewals
    a._thread.join()
    a._thread = None
    time.sleep(4.5)
    b = ShardDirLock(d, run="B", ttl_s=4)
    b.acquire()  # the expired lease is taken over (If-Match on its ETag)
    b.release()
    assert not (storage.location(d) / LOCK_NAME).exists()
    # a holder whose lease was taken over while it stalled notices, and must not write its manifest
    c = ShardDirLock(d, run="C", ttl_s=2)
    c.acquire()
    c._stop.set()  # stalled: no renewals
    c._thread.join()
    time.sleep(2.5)
    d_lock = ShardDirLock(d, run="D", ttl_s=60)
    d_lock.acquire()
    assert c.renew() is False
    with pytest.raises(LockHeld, match="taken over by another run"):
        c.check()
    c.release()  # leaves D's lease alone
    with pytest.raises(LockHeld, match="run 'D'"):
        ShardDirLock(d, run="E").acquire()
    d_lock.release()


def test_readers_refuse_a_shard_set_of_two_configs(tmp_path):
    """A crashed `--force` redo: some shards rewritten with the new config, the manifest of the old run."""
    sd = write_fixture_shards(tmp_path / "s", n_train=6, n_val=0, n_test=0, per_shard=3, size=32)
    # the fixture's shards carry no fingerprint: give them one, as preprocess does, and list it in the manifest
    for name in ("train-000000", "train-000001"):
        st = shardset.read_stats(sd, name)
        st["fingerprint"] = {"sha256": "a" * 64, "components": {}}
        storage.put_atomic(shardset.stats_path(sd, name), json.dumps(st))
    shardset.write_manifest(sd, ["train-000000", "train-000001"])
    assert len(shardset.shard_paths(sd, "train")) == 2
    # the redo rewrote one shard with another config (256-d vs 1280-d features, say) and crashed
    rows = [make_row(i, "train", "train-000001", 16, 32, 0, CODES) for i in range(3, 6)]
    shardset.write_shard(rows, sd, "train-000001", {"sha256": "b" * 64, "components": {}})
    with pytest.raises(shardset.ShardError, match="train-000001 .* was rewritten with another config"):
        shardset.shard_paths(sd, "train")
    shardset.write_manifest(sd, ["train-000000", "train-000001"])  # a manifest listing both configs
    with pytest.raises(shardset.ShardError, match="made with 2 different configs"):
        shardset.shard_paths(sd, "train")
    with pytest.raises(shardset.ShardError, match="made with 2 different configs"):
        shardset.dataset_sha256(sd)


def test_a_failed_write_leaves_no_temporary_file_and_a_run_sweeps_old_ones(tmp_path):
    sd = tmp_path / "s"
    sd.mkdir()
    rows = [make_row(0, "train", "train-000000", 16, 32, 0, CODES)]
    rows[0]["feats"] = None  # webdataset cannot write it: the write fails midway
    with pytest.raises(Exception):
        shardset.write_shard(rows, sd, "train-000000")
    assert [p.name for p in sd.iterdir()] == []
    (sd / ".train-000003.tar.4242.tmp").write_bytes(b"x" * 1000)  # left by a run killed mid-write
    (sd / ".plan.4242.tmp").mkdir()
    (sd / ".plan.4242.tmp" / "part-000000.parquet").write_bytes(b"x")
    (sd / "train-000000.tar").write_bytes(b"a finished shard stays")
    swept = storage.sweep_temp(sd)
    assert sorted(p.name for p in swept) == [".plan.4242.tmp", ".train-000003.tar.4242.tmp"]
    assert [p.name for p in sd.iterdir()] == ["train-000000.tar"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_write_task_whose_worker_keeps_dying_fails_the_run(tmp_path, monkeypatch):
    """The write task's worker is SIGKILLed every time (an OOM kill): Ray retries it a bounded number of times,
    then the run fails and that shard stays unfinished (Ray's default would retry it forever)."""
    import ray

    from densevse.pipeline.preprocess.run import KILL_WRITE, RAY_TASK_RETRIES, preprocess

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv(KILL_WRITE, "train-000001")  # read by the workers of the Ray that preprocess starts
    cfg = load_config("pipeline.yaml", [f"run.output_dir={tmp_path}", "dataset.synthetic.num_images=40",
                                        "dataset.synthetic.test_images=10", "shards.samples_per_shard=10",
                                        "stages.regions.impl=gold_boxes", "stages.regions.params={}",
                                        "stages.parse.impl=gold_trees", "stages.parse.params={}",
                                        "stages.features.params.input_size=64", "ray.num_cpus=2"])
    try:
        t = time.time()
        with pytest.raises(Exception, match=r"(?i)worker|died|crash|system"):
            preprocess(cfg, progress=False)
        assert time.time() - t < 500
        assert RAY_TASK_RETRIES == 3
        assert not shardset.stats_path(cfg.shard_dir, "train-000001").exists()  # not finished: redone on a rerun
        assert not list(cfg.shard_dir.glob(".*.tmp"))
    finally:
        ray.shutdown()
