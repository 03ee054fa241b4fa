"""Reading and checking shard stats: which shards are finished, and whether a tar is the one its stats describe.

A finished shard's tar is trusted by its size and version stamp (a local tar's mtime, an object's ETag) against
its stats, and hashed only when they moved; `full` checks (a resume with --verify) hash every tar.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Iterator

from densevse.pipeline import storage
from densevse.pipeline.shardset.layout import MANIFEST, ShardError, file_sha256, keys_sha256, stats_path, tar_path


def read_stats(shard_dir, shard: str) -> dict | None:
    """A shard's stats, or None when the file is absent or unreadable (the shard is then unfinished)."""
    try:
        return json.loads(stats_path(shard_dir, shard).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def iter_stats(shard_dir, shards: list[str] | None = None) -> Iterator[dict]:
    """Each shard's stats in turn (of `shards`, or every stats file, listed afresh): one in memory at a time."""
    paths = [stats_path(shard_dir, s) for s in shards] if shards is not None \
        else sorted(storage.location(shard_dir).glob("*.stats.json"))
    for p in paths:
        yield json.loads(p.read_text())


def load_stats(shard_dir, shards: list[str] | None = None) -> list[dict]:
    return list(iter_stats(shard_dir, shards))


def tar_problem(shard_dir, st: dict, full: bool) -> str | None:
    """Why a shard's tar is not the one its stats describe (missing, other size, other sha256), or None.

    full=False trusts the recorded sha256 while the tar's size and version stamp (mtime, or ETag of an object)
    are still the recorded ones (one stat, no read) and hashes the tar only when they moved (copied, touched or
    rewritten); full=True always hashes (a resume, which repairs, also catches bytes changed in place with the
    mtime restored)."""
    tar = tar_path(shard_dir, st["shard"])
    try:
        size, version, kind = storage.stamp(tar)
    except FileNotFoundError:
        return f"{tar} is missing"
    if size != st.get("tar_bytes"):
        return f"{tar} has {size} bytes, its stats file says {st.get('tar_bytes')}"
    recorded = st.get(f"tar_{kind}")
    if not full and recorded is not None and version == recorded:
        return None
    if file_sha256(tar) != st.get("tar_sha256"):
        return f"{tar}: sha256 differs from the one in its stats file"
    return None


def finished_shards(shard_dir, planned: dict[str, str], verify: bool = False) -> dict[str, dict]:
    """The stats of each planned shard (name -> keys_sha256 of its planned keys) whose stats list exactly its
    planned keys and whose tar is the one they describe (tar_problem). `verify` (`--verify`) hashes every tar:
    it also catches bytes changed in place with the mtime restored, at the cost of reading the whole set (on
    S3, downloading it).

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


def verified_stats(shard_dir, shard: str, fingerprint: str | None = None) -> dict:
    """A manifest shard's stats, after checking its tar is the one they describe (tar_problem, full=False) and,
    given the manifest's `fingerprint` for it, that it was not rewritten with another config since."""
    st = read_stats(shard_dir, shard)
    where = f"shard {shard} of {storage.location(shard_dir) / MANIFEST}"
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


def summarize_shards(shard_dir, shards: list[str] | None = None) -> dict:
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
