"""Dataset readers: each turns a dataset on disk into sample specs, the input of a preprocessing run.

A sample spec is a dict::

    {"key": "flickr8k_1000268201_693b08cb0e",   # stable, unique, no dots (it is the WebDataset key)
     "split": "train", "source": "/path/to/image.jpg",
     "captions": ["A child in a pink dress ...", ...],
     "gold": {} | {"boxes": [[x0, y0, x1, y1], ...], "labels": [...],
                   "trees": {"0": "(S ...)"},                 # gold PTB trees by caption index, if known
                   "links": {"0": [[start, end, box], ...]},  # gold phrase token span -> box, if known
                   "columns": {"license": ...}},            # a table's save_additional_columns (table, img2dataset)
     "reject": "dataset: ..."}   # optional: the reader itself rejects the sample, with this reason

`source` is a local path or one of stages/fetch.py's URIs: an http(s) URL (table), `<shard>.tar#<member>` or
`<shard>.parquet#<key>` (img2dataset), or an `s3://` / `gs://` object. A reader gets `root` as a pathlib-style
object (pipeline/storage.as_path: a `Path`, or a `UPath` for a dataset.root in object storage), so the same
reader code lists and reads either, and the sources it derives from root are URIs when root is one.

A reader rejects what it can tell is unusable but is no reason to stop the run (Flickr8k's captions under an
id that names no image) by yielding the spec with a `reject` reason: it is planned and recorded in the manifest
like any rejected sample, and no stage touches it. Such specs are kept whatever `dataset.splits` says (they
usually belong to no split).

Readers check the annotation files and raise DatasetError naming file and line for malformed ones (JSON or XML
that does not parse, an image path that is absolute or leaves the dataset folder: base.inside); a missing
or corrupt image is not their business: ingest records it as a rejection. Text files are read as UTF-8
(base.read_text): a caption with undecodable bytes is read, and rejected by ingest with its reason.
"""
from __future__ import annotations

from typing import Iterator

from densevse.pipeline import storage
from densevse.pipeline.datasets import (coco, flickr8k, flickr30k_entities, img2dataset, karpathy,  # noqa: F401 (register)
                               synthetic_reader, table)
from densevse.pipeline.datasets.base import READERS


def read_dataset(cfg, root: storage.Location) -> Iterator[dict]:
    """Sample specs of the configured dataset, restricted to cfg.splits and cfg.limit per split."""
    counts: dict[str, int] = {}
    for spec in READERS.get(cfg.kind)(storage.as_path(root), cfg):
        if spec.get("reject"):
            yield spec
            continue
        if spec["split"] not in cfg.splits:
            continue
        counts[spec["split"]] = counts.get(spec["split"], 0) + 1
        if cfg.limit is None or counts[spec["split"]] <= cfg.limit:
            yield spec
