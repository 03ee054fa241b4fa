"""Shard samples -> what training batches: (sample, caption) pairs in a per-epoch shuffled order, grouped into
batch items, and the vocabularies of the train shards. The samples come from the shard set's reader
(pipeline/shardset: iter_samples, and rank_shards for each Ray Train rank's share); models/batch.py turns items
into tensors."""
from __future__ import annotations

import random
from typing import Iterable, Iterator

from densevse.models.batch import caption_tokens
from densevse.models.vocab import Vocab
from densevse.pipeline.shardset import iter_samples


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


def build_vocabs(paths: list) -> tuple[Vocab, Vocab]:
    """Word vocabulary and node-label vocabulary of the given (train) shards."""
    words, labels = [], set()
    for s in iter_samples(paths):
        for c in s["meta"]["captions"]:
            words += caption_tokens(c)
            labels.update(c["tree"]["labels"])
    return Vocab.build(words), Vocab(sorted(labels))
