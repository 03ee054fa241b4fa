"""Shard files: `{split}-{index:06d}.tar` (WebDataset), `{shard}.stats.json`, and `manifest.parquet`.

A shard is finished when its stats file exists: the tar is written to a temporary name and renamed, then
the stats file likewise, so a crash leaves either a finished shard or one that is redone whole. The stats
file lists every planned sample of the shard with its status, so rejections are recorded next to the data
and the manifest (all shards' samples, one row each) is rebuilt from them. It also records the tar's size,
sha256 and mtime, and the config fingerprint (plan.fingerprint) the shard was made with, so a resume never
mixes configurations and a reader never takes a tar that is not the one its stats describe.

Readers (training, evaluation, tracking) take exactly the shards listed in the manifest (`shard_paths`),
never whatever tars happen to be in the directory: a tar left by an earlier plan is not read.

The shard dir may be an object-store URI (pipeline/storage.py): there the tar is built in a local temporary file
and uploaded, the stats object is one PUT (atomic, so still the "finished" marker, written last), and the
object's ETag stands in for the mtime of a local tar.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from densevse.pipeline import storage
from densevse.pipeline.errors import DatasetError
from densevse.pipeline.storage import Location

MANIFEST = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("n_captions", pa.int32()),
    ("n_caption_rejects", pa.int32()), ("n_regions", pa.int32()), ("n_phrases", pa.int32()),
    ("fingerprint", pa.string()),  # the config fingerprint (sha256) the sample's shard was made with
])
TMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<pid>.tmp" (swept at the start of a run: sweep_temp)


class ShardError(DatasetError):
    """A shard listed in the manifest is missing or is not the tar its stats file describes; names the file."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def stats_path(shard_dir: Location, shard: str) -> Location:
    return storage.join(shard_dir, f"{shard}.stats.json")


def tar_path(shard_dir: Location, shard: str) -> Location:
    return storage.join(shard_dir, f"{shard}.tar")


def shard_of(tar: Location) -> str:
    """The shard name of a tar path or URI (`.../train-000001.tar` -> `train-000001`)."""
    return storage.name(tar).removesuffix(".tar")


def file_sha256(path: Location) -> str:
    """sha256 of a file's bytes, streamed (tars and model files can be large)."""
    with storage.open_file(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path: Location, text: str) -> None:
    """A reader (or a crash) never sees half a file: temporary file + os.replace, or one PUT (storage.put_atomic)."""
    storage.put_atomic(path, text)


def _tmp_for(shard_dir: Location, name: str) -> Path:
    """A local temporary file to build `name` in: next to it (then os.replace), or for a URI a fresh file in the
    temp dir (a unique name: two shard dirs may have shards of the same name). The caller removes it on failure."""
    if storage.is_uri(shard_dir):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        return Path(tmp)
    return Path(shard_dir) / f".{name}.{os.getpid()}{TMP_SUFFIX}"


def sweep_temp(shard_dir: Location) -> list[Path]:
    """Remove the temporary files crashed runs left in a local shard dir (a full disk stays full otherwise);
    returns them. Only safe under the shard dir's lock (preprocess/lock.py): no other run is writing there.
    An object store has none: its temporary files are local to the writer and removed on failure."""
    if storage.is_uri(shard_dir) or not Path(shard_dir).is_dir():
        return []
    d = Path(shard_dir)
    found = sorted([*d.glob(f".*{TMP_SUFFIX}"), *d.glob(".*.old")])  # files, and the plan's temporary dirs
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def _version(path: Location) -> int | str | None:
    """What changes when a file is rewritten: a local file's mtime_ns, an object's ETag."""
    return _stat(path)[1]


def _stat(path: Location) -> tuple[int, int | str | None]:
    """(size, version) in one call (one HEAD request for an object); FileNotFoundError when absent."""
    if not storage.is_uri(path):
        st = Path(path).stat()
        return st.st_size, st.st_mtime_ns
    fs, p = storage.filesystem(path)
    info = fs.info(p)
    if info.get("type") == "directory":
        raise FileNotFoundError(path)
    return int(info["size"]), info.get("ETag")


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
        from densevse.stages.base import npy_load
        n_regions = int(npy_load(row["boxes"]).shape[0])
    return {"key": row["key"], "split": row["split"], "shard": row["shard"], "source": row["source"],
            "status": "rejected" if row["reject"] else "ok", "reason": row["reject"],
            "n_captions": len(caps), "n_caption_rejects": len(json.loads(row["caption_rejects"])),
            "n_regions": n_regions, "n_phrases": sum(len(c.get("phrases", [])) for c in caps)}


def write_shard(rows: list[dict], shard_dir: Path, shard: str, fingerprint: dict | None = None,
                cost: dict | None = None) -> dict:
    """Write one shard atomically; returns its stats (also written to {shard}.stats.json, last), which carry
    `fingerprint` (plan.fingerprint of the config that made the rows) and `cost`, the shard's CPU and wall
    seconds per stage ({step: [cpu_s, wall_s]}), this write's own added as "write"."""
    import webdataset as wds

    t0, cpu0 = time.time(), time.process_time()
    shard_dir = storage.location(shard_dir)
    storage.makedirs(shard_dir)
    rows = sorted(rows, key=lambda r: r["key"])
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {shard} got duplicate keys: {[k for k, n in Counter(keys).items() if n > 1][:5]}")
    tar = tar_path(shard_dir, shard)
    tmp = _tmp_for(shard_dir, f"{shard}.tar")
    try:
        with wds.TarWriter(str(tmp)) as sink:
            for r in rows:
                if not r["reject"]:
                    sink.write(sample_files(r))
        tar_bytes, tar_sha256 = tmp.stat().st_size, file_sha256(tmp)
        storage.upload(tmp, tar)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure (a full disk, a failed upload): never left behind
    samples = [manifest_entry(r) for r in rows]
    rejects = Counter(s["reason"] for s in samples if s["status"] == "rejected")
    caption_rejects = Counter(c["reason"] for r in rows for c in json.loads(r["caption_rejects"]))
    version = _version(tar)
    stats = {"shard": shard, "split": rows[0]["split"] if rows else "", "tar": storage.name(tar),
             "tar_sha256": tar_sha256, "tar_bytes": tar_bytes,
             **({"tar_etag": version} if storage.is_uri(tar) else {"tar_mtime_ns": version}),
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
    write_atomic(stats_path(shard_dir, shard), json.dumps(stats, indent=1))
    return stats


def caption_reject_reasons_short(c: Counter) -> Counter:
    """Group reasons that embed numbers ("caption has 71 words, ...") under one key per kind."""
    out: Counter = Counter()
    for reason, n in c.items():
        out[reason.split(",")[0] if "words" in reason else reason] += n
    return out


def read_stats(shard_dir: Path, shard: str) -> dict | None:
    """A shard's stats, or None when the file is absent or unreadable (the shard is then unfinished)."""
    try:
        return json.loads(storage.read_text(stats_path(shard_dir, shard)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def tar_problem(shard_dir: Path, st: dict, full: bool) -> str | None:
    """Why a shard's tar is not the one its stats describe (missing, other size, other sha256), or None.

    full=False trusts the recorded sha256 while the tar's size and mtime (ETag of an object) are still the
    recorded ones (one stat, no read) and hashes the tar only when they moved (copied, touched or rewritten);
    full=True always hashes (a resume, which repairs, also catches bytes changed in place with the mtime restored)."""
    tar = tar_path(shard_dir, st["shard"])
    try:
        size, version = _stat(tar)
    except FileNotFoundError:
        return f"{tar} is missing"
    if size != st.get("tar_bytes"):
        return f"{tar} has {size} bytes, its stats file says {st.get('tar_bytes')}"
    recorded = st.get("tar_etag" if storage.is_uri(tar) else "tar_mtime_ns")
    if not full and recorded is not None and version == recorded:
        return None
    if file_sha256(tar) != st.get("tar_sha256"):
        return f"{tar}: sha256 differs from the one in its stats file"
    return None


def keys_sha256(keys: list[str]) -> str:
    """One digest of a shard's sample keys (sorted): what the plan records instead of holding every key."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def finished_shards(shard_dir: Path, planned: dict[str, str], verify: bool = False) -> dict[str, dict]:
    """The stats of each planned shard (name -> keys_sha256 of its planned keys) whose stats list exactly its
    planned keys and whose tar is the one they describe: its size and mtime (an object's ETag) are the
    recorded ones, else its sha256 is (tar_problem). `verify` (`--verify`) hashes every tar: it also catches
    bytes changed in place with the mtime restored, at the cost of reading the whole set (on S3, downloading it).

    Anything else (no stats, truncated or altered tar, a changed plan) is redone whole on the next run."""
    done = {}
    for shard, digest in planned.items():
        st = read_stats(shard_dir, shard)
        try:
            listed = keys_sha256([s["key"] for s in st["samples"]]) if st else None
        except (KeyError, TypeError):
            continue
        if listed == digest and tar_problem(shard_dir, st, full=verify) is None:
            done[shard] = st
    return done


def iter_stats(shard_dir: Path, shards: list[str] | None = None) -> Iterator[dict]:
    """Each shard's stats in turn (of `shards`, or every stats file): one in memory at a time."""
    paths = [stats_path(shard_dir, s) for s in shards] if shards is not None \
        else storage.listdir(shard_dir, ".stats.json")
    for p in paths:
        yield json.loads(storage.read_text(p))


def load_stats(shard_dir: Path, shards: list[str] | None = None) -> list[dict]:
    return list(iter_stats(shard_dir, shards))


def write_manifest(shard_dir: Path, shards: list[str]) -> Path:
    """manifest.parquet from the shards' stats, written a shard at a time (its size does not bound memory)."""
    path = storage.join(shard_dir, MANIFEST)
    tmp = _tmp_for(shard_dir, MANIFEST)
    try:
        _write_manifest(tmp, shard_dir, shards)
        storage.upload(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_manifest(tmp: Path, shard_dir: Path, shards: list[str]) -> None:
    with pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as w:
        batch: list[dict] = []
        for st in iter_stats(shard_dir, shards):
            fp = (st.get("fingerprint") or {}).get("sha256")
            batch += [{**s, "fingerprint": fp} for s in st["samples"]]
            if len(batch) >= 65536:
                w.write_table(pa.Table.from_pylist(batch, schema=MANIFEST_SCHEMA))
                batch = []
        w.write_table(pa.Table.from_pylist(batch, schema=MANIFEST_SCHEMA))


def read_manifest(shard_dir: Location) -> dict[str, tuple[str, str | None]]:
    """shard -> (split, config fingerprint) of every manifest shard (the fingerprint is None in a manifest
    written before it was recorded). A ShardError when the shards were made with more than one config: one
    shard set never mixes them (e.g. 256-d and 1280-d features after a crashed `--force` redo)."""
    path = storage.join(shard_dir, MANIFEST)
    if not storage.is_file(path):
        raise FileNotFoundError(f"no {MANIFEST} in {shard_dir}: run `densevse preprocess` first")
    with storage.open_file(path) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("split", "shard", "fingerprint") if c in pf.schema_arrow.names]
        rows = pf.read(columns=cols).to_pylist()
    out = {r["shard"]: (r["split"], r.get("fingerprint")) for r in rows}
    _one_config(path, {s: fp for s, (_, fp) in out.items() if fp})
    return out


def _one_config(where, fingerprints: dict[str, str]) -> None:
    """ShardError naming the configs (fingerprint -> shard count) when the shards hold more than one."""
    kinds = Counter(fingerprints.values())
    if len(kinds) > 1:
        seen = ", ".join(f"{fp[:12]} ({n} shard{'s' * (n != 1)})" for fp, n in kinds.most_common())
        raise ShardError(f"{where}: the shards were made with {len(kinds)} different configs (fingerprints "
                         f"{seen}); a shard set never mixes them: re-run `densevse preprocess` (with --force "
                         f"if a redo was cut short) to finish one")


def manifest_shards(shard_dir: Path, split: str | None = None) -> list[str]:
    """The shards of the manifest (of one split, or all), sorted: the shard set of the last preprocess run."""
    return sorted(s for s, (sp, _) in read_manifest(shard_dir).items() if split is None or sp == split)


def verified_stats(shard_dir: Path, shard: str, fingerprint: str | None = None) -> dict:
    """A manifest shard's stats, after checking its tar is the one they describe (tar_problem, full=False) and,
    given the manifest's `fingerprint` for it, that it was not rewritten with another config since."""
    st = read_stats(shard_dir, shard)
    where = f"shard {shard} of {storage.join(shard_dir, MANIFEST)}"
    if st is None:
        raise ShardError(f"{stats_path(shard_dir, shard)} is missing or unreadable, but {MANIFEST} lists shard "
                         f"{shard}: re-run `densevse preprocess` to redo it")
    problem = tar_problem(shard_dir, st, full=False)
    if problem:
        raise ShardError(f"{problem} ({where}): re-run `densevse preprocess` to redo it")
    made = (st.get("fingerprint") or {}).get("sha256")
    if fingerprint and made != fingerprint:
        raise ShardError(f"{where} was rewritten with another config ({str(made)[:12]}) than the manifest's "
                         f"({fingerprint[:12]}), by a run that did not finish: re-run `densevse preprocess`")
    return st


def shard_paths(shard_dir: Location, split: str) -> list[Location]:
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


def dataset_sha256(shard_dir: Path) -> str | None:
    """One hash of the shard set training reads: each manifest shard's (name, tar sha256, config fingerprint).

    Unlike a hash of manifest.parquet it changes when shard contents change (e.g. other region features for
    the same samples). None when there is no manifest."""
    if not storage.is_file(storage.join(shard_dir, MANIFEST)):
        return None
    h = hashlib.sha256()
    listed = read_manifest(shard_dir)
    for name in sorted(listed):
        st = verified_stats(shard_dir, name, listed[name][1])
        h.update(json.dumps([name, st["tar_sha256"], (st.get("fingerprint") or {}).get("sha256")]).encode() + b"\n")
    return h.hexdigest()


def summarize_shards(shard_dir: Path, shards: list[str] | None = None) -> dict:
    """Per split counts, reject reasons and sizes (what `densevse inspect` and a run's summary print)."""
    out: dict = {}
    for st in iter_stats(shard_dir, shards):
        s = out.setdefault(st["split"], Counter())
        for k in ("n_planned", "n_ok", "n_rejected", "n_captions", "n_caption_rejects", "n_phrases",
                  "n_regions", "tar_bytes"):
            s[k] += st[k]
        s["shards"] += 1
        for reason, n in st["reject_reasons"].items():
            s[f"reject: {reason}"] += n
        for reason, n in st["caption_reject_reasons"].items():
            s[f"caption reject: {reason}"] += n
    for c in out.values():  # what a reader asks first: did the detector and the parser find anything?
        c["regions_per_image"] = round(c["n_regions"] / max(1, c["n_ok"]), 2)
        c["phrases_per_caption"] = round(c["n_phrases"] / max(1, c["n_captions"]), 2)
    return {split: dict(c) for split, c in sorted(out.items())}
