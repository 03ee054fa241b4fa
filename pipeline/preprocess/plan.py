"""The plan: which sample goes to which shard, fixed up front from the dataset, sorted by key, so a re-run finds
the same shards. A pure function of the config and the dataset's files (no Ray).

Also the config fingerprint each shard records (everything that shapes its bytes), and the resume check that
compares it with the finished shards', so one shard set never mixes configurations (e.g. 1280-d and 256-d
features): a finished shard is only skipped when it was made exactly as the current config would make it.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.datasets import read_dataset
from pipeline.errors import ConfigError, DatasetError
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


# Where and how fast a stage runs, not what it writes: left out of the fingerprint.
RUNTIME_PARAMS = frozenset({"threads", "num_threads", "device", "pos_batch_size", "constituency_batch_size"})


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def path_sha256(value: str) -> str:
    """sha256 of the contents of a local model file, or of a dir (every file's relative path and sha256, sorted
    by path): retrained weights under the same path change it. Anything else (a model-zoo name, a URL) is
    hashed as the string."""
    p = Path(value).expanduser()
    if p.is_file():
        return shards.file_sha256(p)
    if p.is_dir():
        files = sorted((f.relative_to(p).as_posix(), f) for f in p.rglob("*") if f.is_file())
        return _digest([[rel, shards.file_sha256(f)] for rel, f in files])
    return _digest(value)


def fingerprint(cfg: PipelineConfig) -> dict:
    """{"sha256": combined, "components": {config key: sha256}} of everything that shapes a shard's bytes: the
    dataset spec, each stage's impl and typed params, the contents of the model files those params name
    (`stages.<stage>.model_files.<param>`), and the shard size. Ray resources (num_cpus, batch_size,
    concurrency) and runtime params (threads, device) are left out: they change how fast shards are made, not what is in them. Components are kept
    so that a mismatch names the keys that changed."""
    comp = {"dataset": _digest(cfg.dataset.model_dump(mode="json")),
            "shards.samples_per_shard": _digest(cfg.shards.samples_per_shard)}
    for name in type(cfg.stages).model_fields:
        sc = getattr(cfg.stages, name)
        params = {k: v for k, v in sc.params.model_dump(mode="json").items() if k not in RUNTIME_PARAMS}
        comp[f"stages.{name}.impl"] = _digest(sc.impl)
        comp[f"stages.{name}.params"] = _digest(params)
        for field in getattr(sc.params, "model_paths", ()):  # the files a stage's Params say it loads
            value = params.get(field)
            if isinstance(value, str):
                comp[f"stages.{name}.model_files.{field}"] = path_sha256(value)
    return {"sha256": _digest(comp), "components": comp}


def changed_keys(current: dict, recorded: dict | None) -> list[str]:
    """The fingerprint components that differ (a key on one side only counts); ["fingerprint (none recorded)"]
    for a shard written before fingerprints were kept (what made it is unknown)."""
    if not recorded or "components" not in recorded:
        return ["fingerprint (none recorded)"]
    if recorded.get("sha256") == current["sha256"]:
        return []
    a, b = current["components"], recorded["components"]
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_resume(current: dict, finished: dict[str, dict], shard_dir: Path, force: bool = False) -> set[str]:
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
