"""The plan: which sample goes to which shard, fixed up front from the dataset, sorted by key, so a re-run finds
the same shards. A pure function of the config and the dataset's files (no Ray).

It is written as Parquet under `<shard_dir>/plan/` (part-NNNNNN.parquet), ONE ROW PER SHARD, each in its own
row group: columns `shard`, `split` and the aligned lists `key`, `source`, `captions` (JSON), `gold` (JSON), keys
sorted. The driver hands Ray Data one small (file, row group) item per shard and the workers read that row group
and build the shard's rows (stages/base.py columns, `shard_rows`), so each shard arrives whole without a
shuffle and the driver never holds the samples. (`ray.data.read_parquet` + a repartition to one shard per block
did the same but cost ~30 s of fixed start-up even for 3,000 samples.) Assignment (as before): per split, keys
sorted, `samples_per_shard` per shard.

Driver memory while planning (`write_plan`), for N samples, honestly: the specs stream through in chunks of
CHUNK_ROWS rows, spooled to Parquet; what is held for all N at once is the key column, as Arrow string arrays per
split (~ len(key) + 4 bytes a sample, + 8 for the sort indices), while it is sorted and checked for
duplicates; besides that, one chunk or group of rows at a time and O(shards) infos. A second pass routes each
chunk's rows to its group of whole shards (found by the groups' first keys), a third sorts each group (at most
max(CHUNK_ROWS, N / MAX_GROUPS) rows) and writes it as one plan file. Spool and plan files: 2-3x the specs on disk.

Also the resume policy: which finished shards a run redoes (check_resume: those made with another config, whose
fingerprint, shardset.fingerprint, differs; retry_shards: those holding rejected samples of a reason).
"""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from densevse.pipeline import storage
from densevse.pipeline.config import PipelineConfig
from densevse.pipeline.datasets import read_dataset
from densevse.pipeline.errors import ConfigError, DatasetError
from densevse.pipeline.shardset import changed_keys, keys_sha256, shard_name
from densevse.stages.base import empty_row

PLAN_DIR = "plan"  # under the shard dir: on a cluster, where every node already reads and writes shards
CHUNK_ROWS = 65536  # samples per spooled chunk and (about) per plan file
MAX_GROUPS = 512  # plan files at most (each open while routing): groups grow past CHUNK_ROWS beyond 33M samples
SAMPLE_COLUMNS = ("split", "key", "source", "captions", "gold", "reject")
LIST_COLUMNS = SAMPLE_COLUMNS[1:]  # per sample, aligned lists in a shard's plan row
PLAN_SCHEMA = pa.schema([("shard", pa.string()), ("split", pa.string()),
                         *((c, pa.list_(pa.string())) for c in LIST_COLUMNS)])


def plan_dir(shard_dir) -> storage.Location:
    return storage.location(shard_dir) / PLAN_DIR


def plan(cfg: PipelineConfig) -> list[dict]:
    """Write the run's plan to <shard_dir>/plan/; returns one small dict per shard (see write_plan). The workers
    read it from there (an object-store shard dir too: not atomic as a whole there, but a plan is rewritten by
    every run and only a shard's stats object marks it finished)."""
    return write_plan(read_dataset(cfg.dataset, cfg.dataset_root), cfg.shards.samples_per_shard, plan_dir(cfg.shard_dir))


def write_plan(specs: Iterable[dict], samples_per_shard: int, out, chunk_rows: int = CHUNK_ROWS) -> list[dict]:
    """Plan the sample specs (pipeline/datasets) into shards and write the plan to `out` (a location, replaced
    whole: built in a local temporary dir, storage.writing); returns, in shard order, {"shard", "split", "n",
    "keys_sha256", "file", "row_group"} per shard.

    Duplicate keys (in any splits) are a DatasetError. The plan depends on the specs and `samples_per_shard`
    only, not on the specs' order or `chunk_rows` (which only sets how the shards are spread over files)."""
    with storage.writing(storage.location(out), is_dir=True) as tmp:
        spool = tmp / "spool"
        spool.mkdir()
        chunks, keys = _spool(specs, spool, chunk_rows)
        groups = _groups(keys, samples_per_shard, chunk_rows)
        del keys
        _route(chunks, groups, spool)
        infos = []
        for g, (split, _, first_shard, n_rows) in enumerate(groups):
            infos += _write_group(spool / f"group-{g:06d}.parquet", tmp / f"part-{g:06d}.parquet", split,
                                  first_shard, n_rows, samples_per_shard)
        shutil.rmtree(spool)
    return infos


def _spool(specs: Iterable[dict], spool: Path, chunk_rows: int) -> tuple[list[Path], dict[str, pa.Array]]:
    """Pass 1: the specs as Parquet chunks of `chunk_rows` samples; returns the chunk files and, per split, the
    keys of all its samples (the compact column that is sorted)."""
    chunks: list[Path] = []
    keys: dict[str, list[pa.Array]] = {}
    cols: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS}

    def flush():
        if not cols["key"]:
            return
        t = pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})
        chunks.append(spool / f"chunk-{len(chunks):06d}.parquet")
        pq.write_table(t, chunks[-1])
        for split in pc.unique(t["split"]).to_pylist():
            keys.setdefault(split, []).append(t["key"].filter(pc.equal(t["split"], split)).combine_chunks())
        for v in cols.values():
            v.clear()

    for s in specs:
        cols["split"].append(s["split"])
        cols["key"].append(s["key"])
        cols["source"].append(s["source"])
        cols["captions"].append(json.dumps(s["captions"]))
        cols["gold"].append(json.dumps(s.get("gold") or {}))
        cols["reject"].append(s.get("reject") or "")  # a reader's own rejection (pipeline/datasets)
        if len(cols["key"]) >= chunk_rows:
            flush()
    flush()
    return chunks, {split: pa.concat_arrays(parts) for split, parts in keys.items()}


def _groups(keys: dict[str, pa.Array], n: int, chunk_rows: int) -> list[tuple]:
    """Sort the keys per split, refuse duplicates (in any splits), and cut each split's shards into groups of
    whole shards; returns (split, first key, first shard index, rows) per group, in plan order."""
    total = sum(len(k) for k in keys.values())
    if total:
        every = pa.chunked_array(list(keys.values()))
        if pc.count_distinct(every).as_py() != total:
            counts = pc.value_counts(every)
            dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
            raise DatasetError(f"dataset has {len(dup)} duplicate sample keys, e.g. {dup[:3].to_pylist()}")
        del every
    per_group = max(1, max(chunk_rows, math.ceil(total / MAX_GROUPS)) // n)  # shards per group
    groups = []
    for split in sorted(keys):
        ks = keys[split]
        ks = ks.take(pc.sort_indices(ks))
        for first in range(0, math.ceil(len(ks) / n), per_group):
            start = first * n
            groups.append((split, ks[start].as_py(), first, min(len(ks), start + per_group * n) - start))
    return groups


def _route(chunks: list[Path], groups: list[tuple], spool: Path) -> None:
    """Pass 2: append each chunk's rows to their group's spool file (found by first key within the split)."""
    ids: dict[str, list[int]] = {}
    for g, (split, *_) in enumerate(groups):
        ids.setdefault(split, []).append(g)
    firsts = {split: np.array([groups[g][1] for g in gs], dtype=object) for split, gs in ids.items()}
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for path in chunks:
            t = pq.read_table(path)
            for split in pc.unique(t["split"]).to_pylist():
                part = t.filter(pc.equal(t["split"], split))
                at = np.searchsorted(firsts[split], part["key"].to_numpy(zero_copy_only=False), side="right") - 1
                for j in np.unique(at):
                    g = ids[split][j]
                    if g not in writers:
                        writers[g] = pq.ParquetWriter(spool / f"group-{g:06d}.parquet", part.schema)
                    writers[g].write_table(part.filter(pa.array(at == j)))
            path.unlink()
    finally:
        for w in writers.values():
            w.close()


def _write_group(src: Path, dst: Path, split: str, first_shard: int, n_rows: int, n: int) -> list[dict]:
    """Pass 3: one group's rows sorted by key, one plan row per shard; returns the shards' infos."""
    t = pq.read_table(src).sort_by("key")
    src.unlink()
    if len(t) != n_rows:  # cannot happen unless a spool file was lost: never write a plan short of samples
        raise RuntimeError(f"plan group {src.name}: {len(t)} rows, expected {n_rows}")
    offsets = pa.array(list(range(0, n_rows, n)) + [n_rows], pa.int32())
    names = [shard_name(split, first_shard + i) for i in range(len(offsets) - 1)]
    lists = {c: pa.ListArray.from_arrays(offsets, t[c].combine_chunks()) for c in LIST_COLUMNS}
    table = pa.table({"shard": pa.array(names, pa.string()), "split": pa.array([split] * len(names), pa.string()),
                      **lists}, schema=PLAN_SCHEMA)
    pq.write_table(table, dst, row_group_size=1)  # one shard per row group: a worker reads just its own
    return [{"shard": name, "split": split, "n": len(ks), "keys_sha256": keys_sha256(ks), "file": dst.name,
             "row_group": i} for i, (name, ks) in enumerate(zip(names, lists["key"].to_pylist()))]


def shard_rows(plan_row: dict) -> list[dict]:
    """The rows (stages/base.py columns) of one shard, from its plan row: what a worker builds."""
    return [empty_row(key=k, split=plan_row["split"], shard=plan_row["shard"], source=s, captions=c, gold=g, reject=r)
            for k, s, c, g, r in zip(*(plan_row[c] for c in LIST_COLUMNS))]


def read_shard(path, row_group: int) -> dict:
    """One shard's plan row, from its file (a location) and row group (see write_plan): on a worker."""
    with storage.location(path).open("rb") as f:
        return pq.ParquetFile(f).read_row_group(row_group).to_pylist()[0]


def check_resume(current: dict, finished: dict[str, dict], shard_dir, force: bool = False) -> set[str]:
    """The finished shards (name -> stats) whose fingerprint differs from `current`, to be redone when `force`;
    without it, a ConfigError naming the changed keys and how many shards each concerns, raised before any
    work: skipping them would silently mix two configurations in one shard set."""
    stale = {s: keys for s, st in finished.items() if (keys := changed_keys(current, st.get("fingerprint")))}
    if not stale or force:
        return set(stale)
    per_key = Counter(k for keys in stale.values() for k in keys)
    changed = ", ".join(f"{k} ({n} shard{'s' * (n != 1)})" for k, n in sorted(per_key.items()))
    raise ConfigError(
        f"{shard_dir}: {len(stale)} of {len(finished)} finished shards were made with another config; changed: "
        f"{changed} (e.g. {', '.join(sorted(stale)[:3])}). Resuming would mix them with shards made with the "
        f"current config. Re-run with --force (`densevse preprocess --force` or `densevse run --force`) to redo "
        f"these {len(stale)} shards, restore the previous settings, or set another shards.dir.")


def retry_shards(finished: dict[str, dict], prefix: str) -> dict[str, int]:
    """The finished shards (name -> stats) holding samples rejected with a reason that starts with `prefix`
    ("" = any rejection), each with how many: what `--retry-rejected [PREFIX]` redoes, e.g. after fixing the
    inputs or a download outage; every other shard is left as it is (not rewritten). Reasons are the
    recorded `<stage>: <reason>` strings (stats' reject_reasons; `densevse inspect --rejects` lists them)."""
    hits = {s: sum(n for reason, n in (st.get("reject_reasons") or {}).items() if reason.startswith(prefix))
            for s, st in finished.items()}
    return {s: n for s, n in sorted(hits.items()) if n}
