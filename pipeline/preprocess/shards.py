"""Shard files: `{split}-{index:06d}.tar` (WebDataset), `{shard}.stats.json`, and `manifest.parquet`.

A shard is finished when its stats file exists: the tar is written to a temporary name and renamed, then
the stats file likewise, so a crash leaves either a finished shard or one that is redone whole. The stats
file lists every planned sample of the shard with its status, so rejections are recorded next to the data
and the manifest (all shards' samples, one row each) is rebuilt from them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("n_captions", pa.int32()),
    ("n_caption_rejects", pa.int32()), ("n_regions", pa.int32()), ("n_phrases", pa.int32()),
])


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def stats_path(shard_dir: Path, shard: str) -> Path:
    return Path(shard_dir) / f"{shard}.stats.json"


def sample_files(row: dict) -> dict:
    """The WebDataset entries of one accepted row (see stages/base.py for the row columns)."""
    meta = {"key": row["key"], "split": row["split"], "source": row["source"], "width": row["width"],
            "height": row["height"], "captions": json.loads(row["captions"]),
            "caption_rejects": json.loads(row["caption_rejects"]), "gold": json.loads(row["gold"])}
    return {"__key__": row["key"], "jpg": row["image"], "boxes.npy": row["boxes"], "feats.npy": row["feats"],
            "json": json.dumps(meta).encode()}


def manifest_entry(row: dict) -> dict:
    caps = json.loads(row["captions"]) if not row["reject"] else []
    n_regions = 0
    if row["boxes"] and not row["reject"]:
        from stages.base import npy_load
        n_regions = int(npy_load(row["boxes"]).shape[0])
    return {"key": row["key"], "split": row["split"], "shard": row["shard"], "source": row["source"],
            "status": "rejected" if row["reject"] else "ok", "reason": row["reject"],
            "n_captions": len(caps), "n_caption_rejects": len(json.loads(row["caption_rejects"])),
            "n_regions": n_regions, "n_phrases": sum(len(c.get("phrases", [])) for c in caps)}


def write_shard(rows: list[dict], shard_dir: Path, shard: str) -> dict:
    """Write one shard atomically; returns its stats (also written to {shard}.stats.json)."""
    import webdataset as wds

    t0 = time.time()
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["key"])
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {shard} got duplicate keys: {[k for k, n in Counter(keys).items() if n > 1][:5]}")
    tar = shard_dir / f"{shard}.tar"
    tmp = shard_dir / f".{shard}.tar.{os.getpid()}.tmp"
    with wds.TarWriter(str(tmp)) as sink:
        for r in rows:
            if not r["reject"]:
                sink.write(sample_files(r))
    os.replace(tmp, tar)
    samples = [manifest_entry(r) for r in rows]
    rejects = Counter(s["reason"] for s in samples if s["status"] == "rejected")
    caption_rejects = Counter(c["reason"] for r in rows for c in json.loads(r["caption_rejects"]))
    stats = {"shard": shard, "split": rows[0]["split"] if rows else "", "tar": tar.name,
             "tar_sha256": hashlib.sha256(tar.read_bytes()).hexdigest(), "tar_bytes": tar.stat().st_size,
             "n_planned": len(rows), "n_ok": sum(s["status"] == "ok" for s in samples),
             "n_rejected": sum(s["status"] == "rejected" for s in samples),
             "n_captions": sum(s["n_captions"] for s in samples),
             "n_caption_rejects": sum(s["n_caption_rejects"] for s in samples),
             "n_phrases": sum(s["n_phrases"] for s in samples), "n_regions": sum(s["n_regions"] for s in samples),
             "reject_reasons": dict(rejects), "caption_reject_reasons": dict(caption_reject_reasons_short(caption_rejects)),
             "seconds": round(time.time() - t0, 3), "samples": samples}
    sp = stats_path(shard_dir, shard)
    tmp_stats = sp.with_name(f".{sp.name}.{os.getpid()}.tmp")
    tmp_stats.write_text(json.dumps(stats, indent=1))
    os.replace(tmp_stats, sp)
    return stats


def caption_reject_reasons_short(c: Counter) -> Counter:
    """Group reasons that embed numbers ("caption has 71 words, ...") under one key per kind."""
    out: Counter = Counter()
    for reason, n in c.items():
        out[reason.split(",")[0] if "words" in reason else reason] += n
    return out


def finished_shards(shard_dir: Path, planned: dict[str, list[str]]) -> set[str]:
    """Shards whose tar and stats exist, agree on the tar's size, and list exactly the planned keys.

    Anything else (no stats, truncated tar, a changed plan) is redone whole on the next run."""
    done = set()
    for shard, keys in planned.items():
        sp, tar = stats_path(shard_dir, shard), Path(shard_dir) / f"{shard}.tar"
        if not sp.exists() or not tar.exists():
            continue
        try:
            st = json.loads(sp.read_text())
            listed = sorted(s["key"] for s in st["samples"])
        except (json.JSONDecodeError, KeyError):
            continue
        if listed == sorted(keys) and st.get("tar_bytes") == tar.stat().st_size:
            done.add(shard)
    return done


def load_stats(shard_dir: Path, shards: list[str] | None = None) -> list[dict]:
    shard_dir = Path(shard_dir)
    paths = [stats_path(shard_dir, s) for s in shards] if shards is not None else sorted(shard_dir.glob("*.stats.json"))
    return [json.loads(p.read_text()) for p in paths]


def write_manifest(shard_dir: Path, shards: list[str]) -> Path:
    rows = [s for st in load_stats(shard_dir, shards) for s in st["samples"]]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = Path(shard_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def shard_paths(shard_dir: Path, split: str) -> list[Path]:
    """The finished tars of a split, in order (a tar without its stats file is unfinished and skipped)."""
    return [p for p in sorted(Path(shard_dir).glob(f"{split}-*.tar")) if stats_path(shard_dir, p.stem).exists()]


def summarize_shards(shard_dir: Path, shards: list[str] | None = None) -> dict:
    """Per split counts, reject reasons and sizes (what `densevse inspect` and a run's summary print)."""
    out: dict = {}
    for st in load_stats(shard_dir, shards):
        s = out.setdefault(st["split"], Counter())
        for k in ("n_planned", "n_ok", "n_rejected", "n_captions", "n_caption_rejects", "n_phrases",
                  "n_regions", "tar_bytes"):
            s[k] += st[k]
        s["shards"] += 1
        for reason, n in st["reject_reasons"].items():
            s[f"reject: {reason}"] += n
        for reason, n in st["caption_reject_reasons"].items():
            s[f"caption reject: {reason}"] += n
    return {split: dict(c) for split, c in sorted(out.items())}
