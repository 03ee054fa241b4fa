"""Resume safety without Ray: the config fingerprint each shard records, the check that refuses to mix
configurations, and how readers verify the manifest's tars (the real-run test is in test_preprocess.py)."""
import json
import os

import pytest

from densevse.pipeline.config import load_config
from densevse.pipeline.errors import ConfigError
from densevse.pipeline import shardset
from densevse.pipeline.preprocess.plan import check_resume
from densevse.pipeline.shardset import changed_keys, fingerprint
from shard_fixture import write_fixture_shards

BASE = ["stages.regions.impl=gold_boxes", "stages.regions.params={}", "stages.parse.impl=gold_trees",
        "stages.parse.params={}"]


def fp(*overrides):
    return fingerprint(load_config("pipeline.yaml", BASE + list(overrides)))


def test_fingerprint_follows_what_shapes_the_shards_not_ray_resources(tmp_path):
    base = fp()
    assert changed_keys(base, fp()) == []
    assert changed_keys(base, fp("stages.features.num_cpus=1", "stages.features.batch_size=3", "ray.num_cpus=1",
                                 "stages.features.concurrency=2", "train.epochs=1")) == []
    assert changed_keys(base, fp("stages.features.impl=efficientnet_lite0_crops", "stages.features.params={}")) == [
        "stages.features.impl", "stages.features.params"]
    assert changed_keys(base, fp("stages.features.params.input_size=160")) == ["stages.features.params"]
    assert changed_keys(base, fp("shards.samples_per_shard=7")) == ["shards.samples_per_shard"]
    assert changed_keys(base, fp("dataset.synthetic.seed=3")) == ["dataset"]


def test_fingerprint_hashes_model_file_contents(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a" * 100)
    det = tmp_path / "det"
    (det / "sub").mkdir(parents=True)
    (det / "config.yaml").write_text("MODEL: {}\n")
    (det / "sub" / "model_final.pth").write_bytes(b"w1")
    args = [f"stages.features.params.weights={weights}", "stages.regions.impl=detectron2",
            f"stages.regions.params={{config: {det}}}"]
    before = fp(*args)
    assert {"stages.features.model_files.weights", "stages.regions.model_files.config"} <= set(before["components"])
    weights.write_bytes(b"b" * 100)  # same path, same size, other bytes
    (det / "sub" / "model_final.pth").write_bytes(b"w2")
    assert changed_keys(before, fp(*args)) == ["stages.features.model_files.weights",
                                               "stages.regions.model_files.config"]
    # a model-zoo name is hashed as the name
    zoo = ["stages.regions.impl=detectron2", "stages.regions.params={config: COCO-Detection/a.yaml}"]
    other = ["stages.regions.impl=detectron2", "stages.regions.params={config: COCO-Detection/b.yaml}"]
    assert "stages.regions.model_files.config" in changed_keys(fp(*zoo), fp(*other))


def test_check_resume_names_changed_keys_and_counts_or_redoes_with_force(tmp_path):
    old, new = fp(), fp("stages.features.params.input_size=160")
    finished = {"train-000000": {"fingerprint": old}, "train-000001": {"fingerprint": old},
                "val-000000": {"fingerprint": new}, "test-000000": {}}
    assert check_resume(new, {"val-000000": finished["val-000000"]}, tmp_path) == set()
    with pytest.raises(ConfigError) as e:
        check_resume(new, finished, tmp_path)
    msg = str(e.value)
    assert "3 of 4 finished shards" in msg and "stages.features.params (2 shards)" in msg
    assert "fingerprint (none recorded) (1 shard)" in msg and "--force" in msg and str(tmp_path) in msg
    assert check_resume(new, finished, tmp_path, force=True) == {"train-000000", "train-000001", "test-000000"}


def test_readers_take_manifest_shards_and_verify_them(tmp_path):
    sd = write_fixture_shards(tmp_path / "s", n_train=6, n_val=0, n_test=3, per_shard=3, size=32)
    train = shardset.shard_paths(sd, "train")
    assert [p.name for p in train] == ["train-000000.tar", "train-000001.tar"]
    digest = shardset.dataset_sha256(sd)
    # a tar + stats of an earlier plan, not in the manifest: never read, not hashed
    for ext in (".tar", ".stats.json"):
        (sd / f"train-000007{ext}").write_bytes((sd / f"train-000000{ext}").read_bytes())
    assert shardset.shard_paths(sd, "train") == train and shardset.dataset_sha256(sd) == digest
    # bytes changed in place, same size: readers re-hash when the mtime moved and name the file
    tar = train[1]
    st = os.stat(tar)
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(shardset.ShardError, match="train-000001.tar: sha256 differs"):
        shardset.shard_paths(sd, "train")
    # ... and with the mtime restored only the full hash of a resume sees it (the documented trade-off)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shardset.shard_paths(sd, "train") == train
    planned = {s: shardset.keys_sha256([r["key"] for r in json.loads(shardset.stats_path(sd, s).read_text())["samples"]])
               for s in ("train-000000", "train-000001")}
    # a resume trusts size + mtime by default (no read of the set); --verify hashes every tar and redoes it
    assert set(shardset.finished_shards(sd, planned)) == set(planned)
    assert set(shardset.finished_shards(sd, planned, verify=True)) == {"train-000000"}
    tar.unlink()
    with pytest.raises(shardset.ShardError, match="train-000001.tar is missing"):
        shardset.shard_paths(sd, "train")
    (sd / shardset.MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="run `densevse preprocess` first"):
        shardset.shard_paths(sd, "train")
