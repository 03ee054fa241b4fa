"""A real local Ray run: a small synthetic set -> WebDataset shards, read back two ways, resumed after damage;
and a Flickr8k-format set with broken inputs, where every bad sample is recorded with its reason."""
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from densevse.pipeline import shardset
from densevse.pipeline.config import load_config
from densevse.pipeline.datasets import synthetic
from densevse.pipeline.preprocess.plan import plan, plan_dir
from densevse.pipeline.preprocess.run import preprocess
from densevse.stages.base import npy_load
from shard_fixture import planned_rows

pytestmark = pytest.mark.slow
# Gold boxes/trees keep this test about the orchestration (the Detectron2 and Stanza stages have their own).
SMALL = ["dataset.synthetic.num_images=48", "dataset.synthetic.test_images=16", "shards.samples_per_shard=10",
         "stages.regions.impl=gold_boxes", "stages.regions.params={}", "stages.parse.impl=gold_trees",
         "stages.parse.params={}", "stages.features.params.input_size=160", "ray.num_cpus=2"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # an earlier test module's Ray (e.g. a cluster client) must not be reused
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("pipeline.yaml", SMALL + [f"run.output_dir={out}"])
    return cfg, preprocess(cfg, progress=False)


def test_shards_manifest_and_stats(run):
    cfg, summary = run
    sd = cfg.shard_dir
    assert summary["samples"] == 48 and summary["shards_written"] == summary["shards"] == 6
    assert sorted(p.name for p in sd.glob("*.tar")) == [
        "test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar",
        "val-000000.tar"]
    manifest = pq.read_table(sd / shardset.MANIFEST).to_pylist()
    assert sorted(r["key"] for r in manifest) == [f"synth_{i:06d}" for i in range(48)]
    assert all(r["status"] == "ok" and r["n_captions"] == 5 and r["n_phrases"] > 0 for r in manifest)
    st = json.loads((sd / "train-000000.stats.json").read_text())
    assert st["n_planned"] == st["n_ok"] == 10 and st["tar_bytes"] == (sd / "train-000000.tar").stat().st_size
    assert summary["splits"]["test"]["n_ok"] == 16
    # every stage's CPU and wall seconds, measured where it ran, in each shard's stats and summed in the summary
    assert set(st["cost"]) == {"plan", "ingest", "regions", "features", "parse", "write"}
    assert all(cpu >= 0 and wall > 0 for cpu, wall in st["cost"].values())
    cost = summary["cost"]
    assert cost["cpu_s"]["features"] > 0 and cost["cores"] == 2 and 0 < cost["efficiency"] <= 1
    assert cost["cpu_s_total"] == pytest.approx(sum(cost["cpu_s"].values()), abs=0.5)


def test_read_back_with_webdataset(run):
    import webdataset as wds
    from PIL import Image

    cfg, _ = run
    samples = list(wds.WebDataset([str(p) for p in sorted(cfg.shard_dir.glob("train-*.tar"))], shardshuffle=False))
    assert len(samples) == 29 and len({s["__key__"] for s in samples}) == 29  # 48 - 16 test - 3 val
    s = samples[0]
    meta = json.loads(s["json"])
    boxes, feats = npy_load(s["boxes.npy"]), npy_load(s["feats.npy"])
    img = Image.open(io.BytesIO(s["jpg"]))
    gold = np.asarray(meta["gold"]["boxes"])
    assert img.size == (meta["width"], meta["height"])
    assert boxes.shape == (len(gold) + 1, 4) and np.allclose(boxes[0], [0, 0, img.width, img.height])
    assert np.allclose(boxes[1:], gold, atol=0.5)
    assert feats.dtype == np.float16 and feats.shape == (len(boxes), 1280) and np.isfinite(feats).all()
    cap = meta["captions"][0]
    assert cap["tree"]["tokens"] == cap["text"].split() and cap["phrases"]
    _, ann = synthetic.make_image(0, int(s["__key__"].split("_")[1]))
    assert [c["text"] for c in meta["captions"]] == ann["captions"]


def test_read_back_with_ray_data(run):
    import ray

    cfg, _ = run
    ds = ray.data.read_webdataset(str(cfg.shard_dir), file_extensions=["tar"], decoder=None)
    rows = ds.take_all()
    assert len(rows) == 48 and sorted(r["__key__"] for r in rows) == [f"synth_{i:06d}" for i in range(48)]
    assert {"jpg", "json"} <= set(rows[0])


def test_resume_redoes_only_damaged_shards(run):
    cfg, _ = run
    sd = cfg.shard_dir
    before = {p.name: p.stat().st_mtime_ns for p in sd.glob("*.tar")}
    manifest_before = pq.read_table(sd / shardset.MANIFEST).to_pylist()
    (sd / "train-000001.tar").unlink()                                  # lost shard
    with open(sd / "test-000000.tar", "r+b") as f:                     # truncated shard (stats intact)
        f.truncate(1000)
    summary = preprocess(cfg, progress=False)
    assert summary["shards_skipped"] == 4 and summary["shards_written"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in sd.glob("*.tar")}
    assert {n for n in after if after[n] != before.get(n)} == {"train-000001.tar", "test-000000.tar"}
    manifest = pq.read_table(sd / shardset.MANIFEST).to_pylist()
    assert sorted(r["key"] for r in manifest) == sorted(r["key"] for r in manifest_before)  # none lost or doubled
    assert preprocess(cfg, progress=False)["shards_written"] == 0       # a finished run is a no-op


def test_plan_is_stable_and_rejects_duplicates(run, tmp_path):
    cfg, _ = run
    infos = plan(cfg)
    a = [(r["key"], r["shard"]) for r in planned_rows(plan_dir(cfg.shard_dir), infos)]  # the plan, on disk
    assert plan(cfg) == infos and [(r["key"], r["shard"]) for r in planned_rows(plan_dir(cfg.shard_dir), infos)] == a
    assert len(a) == 48 and a == sorted(a, key=lambda r: (r[1].split("-")[0], r[0]))


def test_bad_inputs_are_recorded_not_dropped(tmp_path, ray_local, capsys):
    """Flickr8k-format set: good, corrupt, truncated, missing and caption-less samples."""
    root = tmp_path / "f8k"
    (root / "images").mkdir(parents=True)
    lines, names = [], []
    for i, kind in enumerate(["good", "good", "corrupt", "truncated", "missing", "nocaption", "longcaption"]):
        name = f"{i}_{kind}.jpg"
        names.append(name)
        img, ann = synthetic.make_image(0, i)
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        data = {"corrupt": b"garbage" * 10, "truncated": buf.getvalue()[:400]}.get(kind, buf.getvalue())
        if kind != "missing":
            (root / "images" / name).write_bytes(data)
        caps = ann["captions"]
        if kind == "nocaption":
            caps = ["", "  ", "...", "!!", "42"]
        if kind == "longcaption":
            caps = [caps[0]] + [" ".join(["dog"] * 80)] * 4
        lines += [f"{name}#{k}\t{c}" for k, c in enumerate(caps)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names) + "\n")
    cfg = load_config("pipeline.yaml", SMALL + [f"run.output_dir={tmp_path / 'out'}", "dataset.kind=flickr8k",
                                                f"dataset.root={root}", "stages.parse.impl=stanza"])
    # (no gold trees in Flickr8k: the project's Stanza parser, trained and cached on first use, parses them)
    summary = preprocess(cfg, progress=False)
    manifest = {r["key"].removeprefix("flickr8k_"): r for r in pq.read_table(cfg.shard_dir / shardset.MANIFEST).to_pylist()}
    assert len(manifest) == 7 and summary["samples"] == 7
    assert [manifest[f"{i}_good"]["status"] for i in (0, 1)] == ["ok", "ok"]
    assert "not a decodable image" in manifest["2_corrupt"]["reason"]
    assert "corrupt image" in manifest["3_truncated"]["reason"]
    assert "missing image file" in manifest["4_missing"]["reason"]
    assert "no usable caption" in manifest["5_nocaption"]["reason"]
    assert manifest["6_longcaption"]["status"] == "ok" and manifest["6_longcaption"]["n_caption_rejects"] == 4
    st = json.loads((cfg.shard_dir / "train-000000.stats.json").read_text())
    assert st["n_rejected"] == 4 and st["caption_reject_reasons"]["caption has 80 words"] == 4
    import webdataset as wds
    assert len(list(wds.WebDataset(str(cfg.shard_dir / "train-000000.tar"), shardshuffle=False))) == 3
    from densevse.pipeline.cli.main import main
    capsys.readouterr()
    assert main(["inspect", "--shards", str(cfg.shard_dir), "--rejects"]) == 0
    listed = json.loads(capsys.readouterr().out.split("==\n", 1)[1])
    assert listed["train"]["n_rejected"] == 4 and len(listed["rejected"]) == 4
    assert {r["key"].removeprefix("flickr8k_") for r in listed["rejected"]} == {"2_corrupt", "3_truncated", "4_missing",
                                                                      "5_nocaption"}


def test_resume_never_mixes_configs_or_reads_stale_tars(tmp_path, ray_local, capsys):
    """A changed feature config is refused (before any work), --force redoes those shards with the new
    fingerprint; an altered tar is redone; readers take only manifest shards; the dataset hash follows."""
    from densevse.pipeline.cli.main import main
    from densevse.pipeline.errors import ConfigError
    from densevse.pipeline.shardset import fingerprint

    tiny = SMALL + ["dataset.synthetic.num_images=12", "dataset.synthetic.test_images=4",
                    "shards.samples_per_shard=4", f"run.output_dir={tmp_path}"]
    cfg = load_config("pipeline.yaml", tiny + ["stages.features.params.input_size=64"])
    sd = cfg.shard_dir
    first = preprocess(cfg, progress=False)
    n = first["shards"]
    digest = shardset.dataset_sha256(sd)
    train = shardset.shard_paths(sd, "train")
    for ext in (".tar", ".stats.json"):  # a shard of an earlier plan, with its stats, not in the manifest
        (sd / f"train-000099{ext}").write_bytes((sd / f"train-000000{ext}").read_bytes())
    assert shardset.shard_paths(sd, "train") == train and shardset.dataset_sha256(sd) == digest

    changed = tiny + ["stages.features.params.input_size=96"]
    # refused before any work: no shard file is touched (plan/ is re-derived from the dataset on every run)
    mtimes = {p.name: p.stat().st_mtime_ns for p in sd.iterdir() if p.name not in ("plan", ".lock")}
    with pytest.raises(ConfigError, match=rf"{n} of {n} finished shards .*stages\.features\.params \({n} shards\)"):
        preprocess(load_config("pipeline.yaml", changed), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in sd.iterdir() if p.name not in ("plan", ".lock")} == mtimes

    args = ["preprocess", "pipeline.yaml", "--quiet", "--json", "--force"] + [a for o in changed for a in ("-s", o)]
    assert main(args) == 0
    forced = json.loads(capsys.readouterr().out.split("==\n", 1)[1])
    assert forced["shards_written"] == forced["shards_redone_config_changed"] == n
    new_fp = fingerprint(load_config("pipeline.yaml", changed))["sha256"]
    assert {st["fingerprint"]["sha256"] for st in shardset.load_stats(sd, shardset.manifest_shards(sd))} == {new_fp}
    assert shardset.dataset_sha256(sd) != digest
    assert json.loads((sd / "summary.json").read_text())["fingerprint"] == new_fp

    tar = shardset.shard_paths(sd, "train")[0]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    tar.write_bytes(bytes(data))
    with pytest.raises(shardset.ShardError, match=tar.name):
        shardset.shard_paths(sd, "train")
    again = preprocess(load_config("pipeline.yaml", changed), progress=False)
    assert again["shards_written"] == 1 and again["shards_skipped"] == n - 1
    assert shardset.shard_paths(sd, "train") == train


def test_retry_rejected_redoes_only_the_shards_with_matching_rejections(tmp_path, ray_local, caplog):
    """A missing and a corrupt image are rejected; once both files are fixed, `--retry-rejected 'ingest: missing'`
    redoes the missing one's shard only (now holding the sample), every other shard file keeps its bytes; a prefix
    that matches nothing redoes nothing and says so; the flag without a prefix takes any rejection."""
    import hashlib
    import logging
    import webdataset as wds

    from densevse.pipeline.cli.main import main

    tiny = SMALL + ["dataset.synthetic.num_images=12", "dataset.synthetic.test_images=4", "shards.samples_per_shard=4",
                    "stages.features.params.input_size=64", f"run.output_dir={tmp_path}"]
    cfg = load_config("pipeline.yaml", tiny)
    sd = cfg.shard_dir
    synthetic.generate(cfg.dataset_root, cfg.dataset.synthetic)
    infos = plan(cfg)
    first = {}
    for r in planned_rows(plan_dir(sd), infos):
        first.setdefault(r["shard"], r)
    (s_missing, missing), (s_corrupt, corrupt) = sorted(first.items())[0], sorted(first.items())[-1]
    assert s_missing != s_corrupt
    saved = {r["source"]: open(r["source"], "rb").read() for r in (missing, corrupt)}
    os.remove(missing["source"])
    with open(corrupt["source"], "wb") as f:
        f.write(b"not a jpeg" * 20)

    def status():
        return {r["key"]: r for r in pq.read_table(sd / shardset.MANIFEST).to_pylist()}

    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sd.iterdir()
                if p.name.endswith((".tar", ".stats.json"))}

    preprocess(cfg, progress=False)
    assert status()[missing["key"]]["reason"].startswith("ingest: missing image file")
    reason = status()[corrupt["key"]]["reason"]
    assert reason.startswith("ingest:") and "missing" not in reason
    before = digests()
    for path, data in saved.items():  # the inputs fixed
        with open(path, "wb") as f:
            f.write(data)

    summary = preprocess(cfg, progress=False, retry_rejected="ingest: missing")
    assert summary["retry_rejected"] == {"prefix": "ingest: missing", "shards_redone": 1, "samples_retried": 1,
                                         "shards": [s_missing]}
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == summary["shards"] - 1
    after = digests()
    redone = {f"{s_missing}.tar", f"{s_missing}.stats.json"}
    assert {n for n in after if after[n] != before[n]} == redone and set(after) == set(before)
    assert status()[missing["key"]]["status"] == "ok" and status()[corrupt["key"]]["status"] == "rejected"
    keys = [s["__key__"] for s in wds.WebDataset(str(sd / f"{s_missing}.tar"), shardshuffle=False)]
    assert missing["key"] in keys

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="densevse.preprocess"):
        nothing = preprocess(cfg, progress=False, retry_rejected="regions:")
    assert nothing["retry_rejected"]["shards_redone"] == 0 and nothing["shards_written"] == 0
    assert "no finished shard holds a sample rejected with a reason starting with 'regions:'" in caplog.text
    assert digests() == after

    args = ["preprocess", "pipeline.yaml", "--quiet", "--retry-rejected"] + [a for o in tiny for a in ("-s", o)]
    assert main(args) == 0
    anyreason = json.loads((sd / "summary.json").read_text())  # the console's format is not this test's business
    assert anyreason["retry_rejected"]["shards"] == [s_corrupt] and anyreason["shards_written"] == 1
    final = digests()
    assert {n for n in final if final[n] != after[n]} == {f"{s_corrupt}.tar", f"{s_corrupt}.stats.json"}
    assert all(r["status"] == "ok" for r in status().values())
