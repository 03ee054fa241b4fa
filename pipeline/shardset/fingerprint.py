"""The config fingerprint each shard records: everything that shaped its bytes, so one shard set never mixes
configurations (e.g. 1280-d and 256-d features). Preprocessing compares it before resuming (a finished shard is
only skipped when it was made exactly as the current config would make it), readers through the manifest, and a
trained model records the stage model files it names (`recorded_model_files`) so that embedding new input with
other model files warns.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from densevse.pipeline.config import PipelineConfig
from densevse.pipeline.shardset.layout import file_sha256

# Where and how fast a stage runs, not what it writes: left out of the fingerprint.
# The download settings (stages/fetch.py) decide whether a URL is fetched, not what a fetched sample's bytes are
# (a failed one is a rejection, redone by --retry-rejected).
RUNTIME_PARAMS = frozenset({"threads", "num_threads", "device", "pos_batch_size", "constituency_batch_size",
                            "timeout_s", "retries", "backoff_s", "max_redirects", "user_agent", "deny_private"})
# Blocks of dataset options that only their own dataset.kind reads: hashed only for that kind, so adding a
# kind never changes the fingerprint of shards made for another (they would be refused on resume).
KIND_BLOCKS = ("table", "img2dataset")


def dataset_key(ds) -> dict:
    """The dataset spec as fingerprinted: without the option blocks of other kinds."""
    return {k: v for k, v in ds.model_dump(mode="json").items() if k not in KIND_BLOCKS or k == ds.kind}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def path_sha256(value: str) -> str:
    """sha256 of the contents of a local model file, or of a dir (every file's relative path and sha256, sorted
    by path): retrained weights under the same path change it. Anything else (a model-zoo name, a URL) is
    hashed as the string."""
    p = Path(value).expanduser()
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        files = sorted((f.relative_to(p).as_posix(), f) for f in p.rglob("*") if f.is_file())
        return _digest([[rel, file_sha256(f)] for rel, f in files])
    return _digest(value)


def fingerprint(cfg: PipelineConfig) -> dict:
    """{"sha256": combined, "components": {config key: sha256}} of everything that shapes a shard's bytes: the
    dataset spec, each stage's impl and typed params, the contents of the model files those params name
    (`stages.<stage>.model_files.<param>`), and the shard size. Ray resources (num_cpus, batch_size,
    concurrency) and runtime params (threads, device, download settings) are left out: they change how fast
    shards are made, not what is in them. Components are kept so that a mismatch names the keys that changed."""
    comp = {"dataset": _digest(dataset_key(cfg.dataset)),
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


def recorded_model_files(fingerprint: dict | None) -> dict[str, str]:
    """{"<stage>.<field>": sha256} of the model files a shard was made with, from its config fingerprint
    ("stages.<stage>.model_files.<field>" components): what a checkpoint records as "model_files" for
    serving's check_model_files."""
    comp = (fingerprint or {}).get("components") or {}
    return {k[len("stages."):].replace(".model_files.", "."): v for k, v in comp.items()
            if k.startswith("stages.") and ".model_files." in k}
