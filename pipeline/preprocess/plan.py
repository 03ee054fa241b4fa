"""The plan: which sample goes to which shard, fixed up front from the dataset, sorted by key, so a re-run finds
the same shards. A pure function of the config and the dataset's files (no Ray)."""
from __future__ import annotations

import json
from collections import Counter

from pipeline.config import PipelineConfig
from pipeline.datasets import read_dataset
from pipeline.errors import DatasetError
from pipeline.preprocess import shards
from stages.base import empty_row


def plan(cfg: PipelineConfig) -> list[dict]:
    """Rows (stages/base.py columns) for every sample of the run, each assigned to its shard."""
    specs = list(read_dataset(cfg.dataset, cfg.dataset_root))
    keys = Counter(s["key"] for s in specs)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise DatasetError(f"dataset has {len(dup)} duplicate sample keys, e.g. {dup[:3]}")
    rows: list[dict] = []
    per_split: dict[str, list[dict]] = {}
    for s in specs:
        per_split.setdefault(s["split"], []).append(s)
    n = cfg.shards.samples_per_shard
    for split in sorted(per_split):
        for i, s in enumerate(sorted(per_split[split], key=lambda s: s["key"])):
            rows.append(empty_row(key=s["key"], split=split, shard=shards.shard_name(split, i // n),
                                  source=s["source"], captions=json.dumps(s["captions"]),
                                  gold=json.dumps(s.get("gold") or {})))
    return rows
