"""Names and paths of a shard set, and the digests that identify its files.

    <shard_dir>/{split}-{index:06d}.tar   a shard: WebDataset samples (jpg, boxes.npy, feats.npy, json per key)
    <shard_dir>/{shard}.stats.json       its stats, written last: the "finished" marker
    <shard_dir>/manifest.parquet         every planned sample of the last preprocessing run, one row each
    <shard_dir>/summary.json             that run's summary

`shard_dir` is any location (pipeline/storage.py): a local path or an object-store URI.
"""
from __future__ import annotations

import hashlib

from densevse.pipeline import storage
from densevse.pipeline.errors import DatasetError

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"


class ShardError(DatasetError):
    """A shard listed in the manifest is missing or is not the tar its stats file describes; names the file."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def stats_path(shard_dir, shard: str) -> storage.Location:
    return storage.location(shard_dir) / f"{shard}.stats.json"


def tar_path(shard_dir, shard: str) -> storage.Location:
    return storage.location(shard_dir) / f"{shard}.tar"


def shard_of(tar) -> str:
    """The shard name of a tar's location (`.../train-000001.tar` -> `train-000001`)."""
    return storage.location(tar).name.removesuffix(".tar")


def file_sha256(path) -> str:
    """sha256 of a file's bytes, streamed (tars and model files can be large)."""
    with storage.location(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def keys_sha256(keys: list[str]) -> str:
    """One digest of a shard's sample keys (sorted): what the plan records instead of holding every key, and
    what a finished shard's stats are checked against."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
