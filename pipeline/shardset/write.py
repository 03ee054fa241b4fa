"""Writing one shard: its tar (WebDataset) and then its stats file, the "finished" marker.

The tar is built in a local temporary file and published whole (storage.writing: os.replace locally, one
upload for an object store), then the stats file likewise, so a crash leaves either a finished shard or one
that is redone whole. The stats list every planned sample of the shard with its status, so rejections are
recorded next to the data and the manifest is rebuilt from them; they also record the tar's size, sha256 and
version stamp (a local tar's mtime, an object's ETag: tar_mtime_ns / tar_etag) and the config fingerprint
(shardset.fingerprint) the shard was made with.
"""
from __future__ import annotations

import json
import time
from collections import Counter

from densevse.pipeline import storage
from densevse.pipeline.shardset.layout import file_sha256, stats_path, tar_path


def sample_files(row: dict) -> dict:
    """The WebDataset entries of one accepted row (see stages/base.py for the row columns)."""
    meta = {"key": row["key"], "split": row["split"], "source": row["source"], "width": row["width"],
            "height": row["height"], "captions": json.loads(row["captions"]),
            "caption_rejects": json.loads(row["caption_rejects"]), "gold": json.loads(row["gold"])}
    return {"__key__": row["key"], "jpg": row["image"], "boxes.npy": row["boxes"], "feats.npy": row["feats"],
            "json": json.dumps(meta).encode()}


def manifest_entry(row: dict) -> dict:
    """A row's line in its shard's stats (and so in the manifest): status, reason and counts."""
    caps = json.loads(row["captions"]) if not row["reject"] else []
    n_regions = 0
    if row["boxes"] and not row["reject"]:
        from densevse.stages.base import npy_load
        n_regions = int(npy_load(row["boxes"]).shape[0])
    return {"key": row["key"], "split": row["split"], "shard": row["shard"], "source": row["source"],
            "status": "rejected" if row["reject"] else "ok", "reason": row["reject"],
            "n_captions": len(caps), "n_caption_rejects": len(json.loads(row["caption_rejects"])),
            "n_regions": n_regions, "n_phrases": sum(len(c.get("phrases", [])) for c in caps)}


def write_shard(rows: list[dict], shard_dir, shard: str, fingerprint: dict | None = None,
                cost: dict | None = None) -> dict:
    """Write one shard atomically; returns its stats (also written to {shard}.stats.json, last), which carry
    `fingerprint` (shardset.fingerprint of the config that made the rows) and `cost`, the shard's CPU and wall
    seconds per stage ({step: [cpu_s, wall_s]}), this write's own added as "write"."""
    import webdataset as wds

    t0, cpu0 = time.time(), time.process_time()
    rows = sorted(rows, key=lambda r: r["key"])
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {shard} got duplicate keys: {[k for k, n in Counter(keys).items() if n > 1][:5]}")
    tar = tar_path(shard_dir, shard)
    with storage.writing(tar) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for r in rows:
                if not r["reject"]:
                    sink.write(sample_files(r))
        tar_bytes, tar_sha256 = tmp.stat().st_size, file_sha256(tmp)
    samples = [manifest_entry(r) for r in rows]
    rejects = Counter(s["reason"] for s in samples if s["status"] == "rejected")
    caption_rejects = Counter(c["reason"] for r in rows for c in json.loads(r["caption_rejects"]))
    stamp = storage.stamp(tar)
    stats = {"shard": shard, "split": rows[0]["split"] if rows else "", "tar": tar.name,
             "tar_sha256": tar_sha256, "tar_bytes": tar_bytes, f"tar_{stamp.kind}": stamp.version,
             "fingerprint": fingerprint,
             "n_planned": len(rows), "n_ok": sum(s["status"] == "ok" for s in samples),
             "n_rejected": sum(s["status"] == "rejected" for s in samples),
             "n_captions": sum(s["n_captions"] for s in samples),
             "n_caption_rejects": sum(s["n_caption_rejects"] for s in samples),
             "n_phrases": sum(s["n_phrases"] for s in samples), "n_regions": sum(s["n_regions"] for s in samples),
             "reject_reasons": dict(rejects), "caption_reject_reasons": dict(caption_reject_reasons_short(caption_rejects)),
             "seconds": round(time.time() - t0, 3), "samples": samples}
    if cost is not None:
        stats["cost"] = {**cost, "write": [round(time.process_time() - cpu0, 4), stats["seconds"]]}
    storage.put_atomic(stats_path(shard_dir, shard), json.dumps(stats, indent=1))
    return stats


def caption_reject_reasons_short(c: Counter) -> Counter:
    """Group reasons that embed numbers ("caption has 71 words, ...") under one key per kind."""
    out: Counter = Counter()
    for reason, n in c.items():
        out[reason.split(",")[0] if "words" in reason else reason] += n
    return out
