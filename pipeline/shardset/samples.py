"""Reading samples out of shard tars: what training, evaluation, the index, the report and tracking iterate.

A sample is {"key", "meta" (the json entry: captions with tokens, tree, phrases; gold; source, size),
"boxes" (R, 4) float32 with row 0 the whole image, "feats" (R, D) float32} and, when asked, "jpg". Tars are
read through their location (a local file, or an object streamed from the store). models/batch.py turns
samples into tensors.
"""
from __future__ import annotations

import io
import json
from typing import Iterable, Iterator

import numpy as np

from densevse.pipeline import storage


def rank_shards(paths: list, rank: int, world: int) -> list[tuple]:
    """This rank's share of the train data, as reads (tar, k, n): keep the samples j of the tar with j % n == k.

    With at least `world` shards, rank r reads whole shards r, r+world, ... (k=0, n=1). With fewer shards that
    would leave ranks without data, so every rank reads every shard and keeps every world-th sample (offset by
    the shard's position, so remainders spread over the ranks). Disjoint and complete either way."""
    paths = list(paths)
    if len(paths) >= world:
        return [(p, 0, 1) for p in paths[rank::world]]
    return [(p, (rank + i) % world, world) for i, p in enumerate(paths)]


def iter_samples(paths: Iterable, with_image: bool = False) -> Iterator[dict]:
    """Decoded samples of the given tars (or (tar, k, n) reads from rank_shards), in order. JPEGs are only kept
    when asked for (figures)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for read in paths:
        path, k, n = read if isinstance(read, tuple) else (read, 0, 1)
        path = storage.location(path)
        with path.open("rb") as stream:  # WebDataset's own tar reading, on the location's stream
            for j, s in enumerate(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))):
                if j % n != k:
                    continue
                out = {"key": s["__key__"], "meta": json.loads(s["json"]),
                       "boxes": np.load(io.BytesIO(s["boxes.npy"])).astype(np.float32),
                       "feats": np.load(io.BytesIO(s["feats.npy"])).astype(np.float32)}
                if with_image:
                    out["jpg"] = s["jpg"]
                yield out


def eval_items(paths: list, captions_per_image: int, batch_images: int,
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
