"""manifest.parquet: the shard set a preprocessing run made, and the only shards readers take.

One row per planned sample (rejected ones with their reason), with its shard's config fingerprint. Readers
(training, evaluation, the index, the report, tracking) take exactly the shards listed here (`shard_paths`),
checked against their stats, never whatever tars happen to be in the directory: a tar left by an earlier plan
is not read, nor a shard rewritten with another config since, nor a manifest of two configs.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from densevse.pipeline import storage
from densevse.pipeline.shardset.layout import MANIFEST, ShardError, tar_path
from densevse.pipeline.shardset.stats import iter_stats, verified_stats

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("n_captions", pa.int32()),
    ("n_caption_rejects", pa.int32()), ("n_regions", pa.int32()), ("n_phrases", pa.int32()),
    ("fingerprint", pa.string()),  # the config fingerprint (sha256) the sample's shard was made with
])


def write_manifest(shard_dir, shards: list[str]) -> storage.Location:
    """manifest.parquet from the shards' stats, written a shard at a time (its size does not bound memory)."""
    path = storage.location(shard_dir) / MANIFEST
    with storage.writing(path) as tmp, pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as w:
        batch: list[dict] = []
        for st in iter_stats(shard_dir, shards):
            fp = (st.get("fingerprint") or {}).get("sha256")
            batch += [{**s, "fingerprint": fp} for s in st["samples"]]
            if len(batch) >= 65536:
                w.write_table(pa.Table.from_pylist(batch, schema=MANIFEST_SCHEMA))
                batch = []
        w.write_table(pa.Table.from_pylist(batch, schema=MANIFEST_SCHEMA))
    return path


def _read(shard_dir, columns: list[str]) -> list[dict]:
    path = storage.location(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {shard_dir}: run `densevse preprocess` first")
    with path.open("rb") as f:
        pf = pq.ParquetFile(f)
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names]).to_pylist()


def read_manifest(shard_dir) -> dict[str, tuple[str, str | None]]:
    """shard -> (split, config fingerprint) of every manifest shard (the fingerprint is None in a manifest
    written before it was recorded). A ShardError when the shards were made with more than one config: one
    shard set never mixes them (e.g. 256-d and 1280-d features after a crashed `--force` redo)."""
    out = {r["shard"]: (r["split"], r.get("fingerprint")) for r in _read(shard_dir, ["split", "shard", "fingerprint"])}
    _one_config(storage.location(shard_dir) / MANIFEST, {s: fp for s, (_, fp) in out.items() if fp})
    return out


def rejected_samples(shard_dir) -> list[dict]:
    """{"key", "reason"} of every rejected sample of the manifest (`densevse inspect --rejects`)."""
    return [{"key": r["key"], "reason": r["reason"]} for r in _read(shard_dir, ["key", "status", "reason"])
            if r["status"] == "rejected"]


def _one_config(where, fingerprints: dict[str, str]) -> None:
    """ShardError naming the configs (fingerprint -> shard count) when the shards hold more than one."""
    kinds = Counter(fingerprints.values())
    if len(kinds) > 1:
        seen = ", ".join(f"{fp[:12]} ({n} shard{'s' * (n != 1)})" for fp, n in kinds.most_common())
        raise ShardError(f"{where}: the shards were made with {len(kinds)} different configs (fingerprints "
                         f"{seen}); a shard set never mixes them: re-run `densevse preprocess` (with --force "
                         f"if a redo was cut short) to finish one")


def manifest_shards(shard_dir, split: str | None = None) -> list[str]:
    """The shards of the manifest (of one split, or all), sorted: the shard set of the last preprocess run."""
    return sorted(s for s, (sp, _) in read_manifest(shard_dir).items() if split is None or sp == split)


def shard_paths(shard_dir, split: str) -> list[storage.Location]:
    """The tars of the manifest's shards of a split, in order; ShardError naming the file if one is missing or
    is not the tar its stats describe.

    Only manifest shards: a tar of an earlier plan (other shard size, other splits) may still lie in the
    directory with its stats and must not be read. Verification is size + mtime against the stats, re-hashing
    a tar only when its mtime moved: every training/evaluation start calls this, and hashing every tar each time
    would read the whole set; in-place damage that keeps the mtime is caught by the full hash of a resume."""
    listed = read_manifest(shard_dir)
    names = sorted(s for s, (sp, _) in listed.items() if sp == split)
    for name in names:
        verified_stats(shard_dir, name, listed[name][1])
    return [tar_path(shard_dir, name) for name in names]


def dataset_sha256(shard_dir) -> str | None:
    """One hash of the shard set training reads: each manifest shard's (name, tar sha256, config fingerprint).

    Unlike a hash of manifest.parquet it changes when shard contents change (e.g. other region features for
    the same samples). None when there is no manifest."""
    if not (storage.location(shard_dir) / MANIFEST).is_file():
        return None
    h = hashlib.sha256()
    listed = read_manifest(shard_dir)
    for name in sorted(listed):
        st = verified_stats(shard_dir, name, listed[name][1])
        h.update(json.dumps([name, st["tar_sha256"], (st.get("fingerprint") or {}).get("sha256")]).encode() + b"\n")
    return h.hexdigest()
