"""Shards -> the items training and evaluation batch: reads the WebDataset tars written by preprocessing
(pipeline/preprocess/shards.py), splits them over Ray Train ranks, and yields (sample, captions) items in a
per-epoch shuffled order. models/batch.py turns items into tensors."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from densevse.models.batch import caption_tokens
from densevse.models.vocab import Vocab
from densevse.pipeline import storage
from densevse.pipeline.preprocess.shards import shard_paths  # noqa: F401  (re-exported: the finished tars of a split)


def rank_shards(paths: list[Path], rank: int, world: int) -> list[tuple[Path, int, int]]:
    """This rank's share of the train data, as reads (tar, k, n): keep the samples j of the tar with j % n == k.

    With at least `world` shards, rank r reads whole shards r, r+world, ... (k=0, n=1). With fewer shards that
    would leave ranks without data, so every rank reads every shard and keeps every world-th sample (offset by
    the shard's position, so remainders spread over the ranks). Disjoint and complete either way."""
    paths = list(paths)
    if len(paths) >= world:
        return [(p, 0, 1) for p in paths[rank::world]]
    return [(p, (rank + i) % world, world) for i, p in enumerate(paths)]


def _gopen_storage(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return storage.open_file(url, mode)


def iter_samples(paths: Iterable, with_image: bool = False) -> Iterator[dict]:
    """Decoded samples of the given tars (or (tar, k, n) reads from rank_shards), in order. JPEGs are only kept
    when asked for (figures)."""
    import webdataset as wds
    from webdataset.gopen import gopen_schemes

    same = lambda x: x  # noqa: E731  (the rank split is ours; no node/worker splitting by webdataset)
    for read in paths:
        path, k, n = read if isinstance(read, tuple) else (read, 0, 1)
        if storage.is_uri(path):  # webdataset opens URLs through its gopen table: object stores via fsspec
            gopen_schemes[storage.scheme(path)] = _gopen_storage
        ds = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=same, workersplitter=same, empty_check=False)
        for j, s in enumerate(ds):
            if j % n != k:
                continue
            out = {"key": s["__key__"], "meta": json.loads(s["json"]),
                   "boxes": np.load(io.BytesIO(s["boxes.npy"])).astype(np.float32),
                   "feats": np.load(io.BytesIO(s["feats.npy"])).astype(np.float32)}
            if with_image:
                out["jpg"] = s["jpg"]
            yield out


def iter_pairs(paths: list, epoch: int, seed: int, max_tokens: int, buffer: int = 2000) -> Iterator[tuple]:
    """(sample, caption) pairs in a per-epoch shuffled order: every caption of every sample once per epoch
    (captions longer than max_tokens are dropped), shard order shuffled, then a shuffle buffer.
    `paths`: tars or rank_shards reads."""
    rng = random.Random(seed * 100003 + epoch)
    paths = list(paths)
    rng.shuffle(paths)
    buf: list = []
    for s in iter_samples(paths):
        for c in s["meta"]["captions"]:
            if len(c["tree"]["tokens"]) > max_tokens:
                continue
            buf.append((s, c))
            if len(buf) >= buffer:
                yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def batched_pairs(pairs: Iterable[tuple], batch_size: int) -> Iterator[list[tuple[dict, list[dict]]]]:
    """Group `batch_size` pairs into items (sample, [its captions in this batch]), images deduplicated."""
    chunk: list = []
    for p in pairs:
        chunk.append(p)
        if len(chunk) == batch_size:
            yield _group(chunk)
            chunk = []
    if chunk:
        yield _group(chunk)


def _group(pairs):
    items: dict[str, tuple[dict, list]] = {}
    for s, c in pairs:
        items.setdefault(s["key"], (s, []))[1].append(c)
    return list(items.values())


def build_vocabs(paths: list[Path]) -> tuple[Vocab, Vocab]:
    """Word vocabulary and node-label vocabulary of the given (train) shards."""
    words, labels = [], set()
    for s in iter_samples(paths):
        for c in s["meta"]["captions"]:
            words += caption_tokens(c)
            labels.update(c["tree"]["labels"])
    return Vocab.build(words), Vocab(sorted(labels))


def eval_items(paths: list[Path], captions_per_image: int, batch_images: int,
               with_image: bool = False) -> Iterator[list[tuple[dict, list[dict]]]]:
    """Evaluation batches: each image with (at most) its first `captions_per_image` captions."""
    chunk = []
    for s in iter_samples(paths, with_image=with_image):
        chunk.append((s, s["meta"]["captions"][:captions_per_image]))
        if len(chunk) == batch_images:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
