"""The streamed plan without Ray: Parquet, one row per shard, the same assignment as sorting every sample in
memory (per split, by key, samples_per_shard each) whatever the input order and chunking; duplicates refused;
and which finished shards `--retry-rejected PREFIX` redoes."""
import json
import random

import pyarrow.parquet as pq
import pytest

from densevse.pipeline.errors import DatasetError
from densevse.pipeline import shardset
from densevse.pipeline.preprocess.plan import PLAN_SCHEMA, retry_shards, shard_rows, write_plan
from densevse.stages.base import COLUMNS
from shard_fixture import planned_rows


def specs(n, seed=0):
    rnd = random.Random(seed)
    out = [{"key": f"k{rnd.randrange(10**9):09d}_{i}", "split": rnd.choice(["train", "train", "val", "test"]),
            "source": f"/img/{i}.jpg", "captions": [f"caption {i}", "another one"],
            **({"gold": {"boxes": [[0, 0, 1, 1]]}} if i % 3 else {})} for i in range(n)]
    rnd.shuffle(out)
    return out


def reference(sp, n):
    """Today's assignment, in memory: per split (sorted), keys sorted, i // n."""
    rows = []
    for split in sorted({s["split"] for s in sp}):
        for i, s in enumerate(sorted((s for s in sp if s["split"] == split), key=lambda s: s["key"])):
            rows.append((s["key"], split, shardset.shard_name(split, i // n), s["source"], json.dumps(s["captions"]),
                         json.dumps(s.get("gold") or {})))
    return rows


@pytest.mark.parametrize("chunk_rows", [7, 64, 100000])
def test_plan_matches_the_in_memory_sort_whatever_the_chunking(tmp_path, chunk_rows):
    sp = specs(203)
    infos = write_plan(iter(sp), 10, tmp_path / "plan", chunk_rows=chunk_rows)
    got = [(r["key"], r["split"], r["shard"], r["source"], r["captions"], r["gold"])
           for r in planned_rows(tmp_path / "plan", infos)]
    assert got == reference(sp, 10)
    assert [i["shard"] for i in infos] == sorted({r[2] for r in got}) and sum(i["n"] for i in infos) == 203
    for i in infos:
        ks = [r[0] for r in got if r[2] == i["shard"]]
        assert i["n"] == len(ks) <= 10 and i["keys_sha256"] == shardset.keys_sha256(ks)
    files = sorted((tmp_path / "plan").iterdir())
    assert all(f.name.startswith("part-") and pq.read_schema(f).equals(PLAN_SCHEMA) for f in files)
    per_file = [pq.read_table(f, columns=["shard"])["shard"].to_pylist() for f in files]
    assert sorted(s for f in per_file for s in f) == [i["shard"] for i in infos]  # each shard in one row
    if chunk_rows == 7:
        assert len(files) > 10  # chunked: routed through many groups
    # same specs in another order: the same plan
    again = write_plan(iter(list(reversed(sp))), 10, tmp_path / "plan", chunk_rows=chunk_rows)
    assert again == infos
    assert [(r["key"], r["shard"]) for r in planned_rows(tmp_path / "plan", again)] == [(r[0], r[2]) for r in got]
    assert not [p for p in tmp_path.iterdir() if p.name != "plan"]  # no temporary dirs left


def test_shard_rows_are_stage_rows(tmp_path):
    infos = write_plan(iter(specs(12)), 4, tmp_path / "plan")
    r = planned_rows(tmp_path / "plan", infos)[0]
    assert tuple(r) == COLUMNS and r["image"] == b"" and r["reject"] == "" and json.loads(r["captions"])
    row = pq.read_table(sorted((tmp_path / "plan").iterdir())[0]).to_pylist()[0]
    assert [x["key"] for x in shard_rows(row)] == row["key"]


def test_duplicate_keys_are_refused_even_across_splits(tmp_path):
    sp = specs(30)
    sp.append({**sp[0], "split": "val" if sp[0]["split"] != "val" else "test"})
    with pytest.raises(DatasetError, match=rf"1 duplicate sample keys, e.g. \['{sp[0]['key']}'\]"):
        write_plan(iter(sp), 4, tmp_path / "plan", chunk_rows=7)
    assert not (tmp_path / "plan").exists() and not list(tmp_path.iterdir())


def test_empty_dataset_plans_no_shard(tmp_path):
    assert write_plan(iter([]), 4, tmp_path / "plan") == []
    assert list((tmp_path / "plan").iterdir()) == []


def test_retry_shards_selects_by_reason_prefix():
    finished = {"train-000000": {"reject_reasons": {"ingest: download failed: HTTP 503 (http://x/a.jpg)": 2,
                                                    "parse: no caption parsed": 1}},
                "train-000001": {"reject_reasons": {"ingest: missing image file /d/b.jpg": 1}},
                "val-000000": {"reject_reasons": {}}, "test-000000": {}}
    assert retry_shards(finished, "ingest: download") == {"train-000000": 2}
    assert retry_shards(finished, "ingest:") == {"train-000000": 2, "train-000001": 1}
    assert retry_shards(finished, "") == {"train-000000": 3, "train-000001": 1}
    assert retry_shards(finished, "regions:") == {}


def test_fingerprint_ignores_download_settings_and_other_kinds_options():
    """Shards made before the table/img2dataset kinds and the downloader existed keep their fingerprint: those
    options are not part of it unless they can change the shard bytes (a table run hashes its table block)."""
    from densevse.pipeline.config import load_config
    from densevse.pipeline.shardset import fingerprint

    base = fingerprint(load_config("pipeline.yaml"))
    same = fingerprint(load_config("pipeline.yaml", overrides=[
        "stages.ingest.params.timeout_s=3", "stages.ingest.params.retries=0", "stages.ingest.params.user_agent=x",
        "dataset.table.url_col=image", "dataset.img2dataset.split=val"]))
    assert same["sha256"] == base["sha256"]
    changed = fingerprint(load_config("pipeline.yaml", overrides=["stages.ingest.params.max_side=320"]))
    assert "stages.ingest.params" in [k for k in base["components"]
                                      if base["components"][k] != changed["components"][k]]
    t1 = load_config("pipeline.yaml", overrides=["dataset.kind=table", "dataset.root=/d", "dataset.table.file=a.csv"])
    t2 = load_config("pipeline.yaml", overrides=["dataset.kind=table", "dataset.root=/d", "dataset.table.file=a.csv",
                                                  "dataset.table.caption_col=text"])
    assert fingerprint(t1)["components"]["dataset"] != fingerprint(t2)["components"]["dataset"]
