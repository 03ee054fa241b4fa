"""A table of (image, caption) rows: csv, tsv, jsonl or parquet, with img2dataset's option names.

    dataset:
      kind: table
      root: data/my_captions
      table: {file: captions.csv, url_col: url, caption_col: caption, split_col: split,
              save_additional_columns: [license]}

`url_col` holds an http(s) URL (downloaded by ingest: stages/fetch.py) or a local path relative to the table's
folder (kept inside it: base.inside). The rows of one image (same cell value) become one sample with their
captions in row order; its split is `split_col`'s (default_split where unset or empty; two rows of one image
in two splits are a DatasetError), and its `save_additional_columns` are its first row's, kept in
gold["columns"]. Keys are `table_<file stem>_<16 hex of sha256(image)>`: stable, unique, no dots.

A column the config names that the table lacks, an empty image cell, or a line that does not parse is a
DatasetError naming the file (and line); an empty or non-text caption is read and rejected by ingest with its
reason. The grouping holds one entry per image in memory (the plan holds all keys anyway).
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlparse

from densevse.pipeline.config import TABLE_FORMATS
from densevse.pipeline.datasets.base import READERS, inside, make_key, require
from densevse.pipeline.errors import DatasetError


def read_rows(path: Path, fmt: str) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """The table's column names and its rows as (line or row number, {column: value})."""
    require(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(path.open("rb"))  # a Path or a UPath (dataset.root in object storage)
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends: not a parquet file
            raise DatasetError(f"{path}: not a readable parquet file ({e})") from None

        def rows():
            n = 0
            for batch in f.iter_batches(batch_size=65536):
                for r in batch.to_pylist():
                    n += 1
                    yield n, r
        return f.schema_arrow.names, rows()
    # Streamed, decoded as base.read_text does (UTF-8, BOM dropped, bad bytes kept for ingest to reject)
    f = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    if fmt == "jsonl":
        def rows():
            with f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{lineno}: not valid JSON ({e})") from None
                    if not isinstance(r, dict):
                        raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
                    yield lineno, r
        it = rows()
        first = next(it, None)  # jsonl has no header: the columns are the first object's (later rows: per row)
        return (list(first[1]) if first else []), itertools.chain([first] if first else [], it)
    reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
    columns = list(reader.fieldnames or [])

    def rows():
        with f:
            for r in reader:
                if None in r:  # more cells than header columns
                    raise DatasetError(f"{path}:{reader.line_num}: {len(r) - 1 + len(r[None])} cells, "
                                       f"the header has {len(columns)}")
                yield reader.line_num, r
    return columns, rows()


def json_value(v):
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


@READERS.register("table")
def read_table(root: Path, cfg):
    tc = cfg.table
    path = root / tc.file
    fmt = tc.input_format or TABLE_FORMATS[path.suffix.lower()]  # config checked the suffix
    columns, rows = read_rows(path, fmt)
    wanted = {"url_col": tc.url_col, "caption_col": tc.caption_col,
              **({"split_col": tc.split_col} if tc.split_col else {}),
              **{f"save_additional_columns[{i}]": c for i, c in enumerate(tc.save_additional_columns)}}
    for option, col in wanted.items():
        if col not in columns:
            raise DatasetError(f"{path}: dataset.table.{option} {col!r} is not a column of the table; its "
                               f"columns are {columns}")
    prefix = make_key("table", path.name)
    images: dict[str, dict] = {}
    for lineno, r in rows:
        missing = [c for c in wanted.values() if c not in r]
        if missing:
            raise DatasetError(f"{path}:{lineno}: no {missing[0]!r} in this row")
        image = r[tc.url_col]
        if not isinstance(image, str) or not image.strip():
            raise DatasetError(f"{path}:{lineno}: {tc.url_col} is empty; every row needs an image")
        image = image.strip()
        split = str((r[tc.split_col] if tc.split_col else None) or tc.default_split)
        spec = images.get(image)
        if spec is None:
            if image.startswith(("http://", "https://")):
                source, name = image, PurePosixPath(urlparse(image).path).stem
            else:
                source, name = str(inside(path.parent, path, image)), Path(image).stem
            digest = hashlib.sha256(image.encode("utf-8", "surrogateescape")).hexdigest()[:16]
            spec = images[image] = {
                "key": make_key(prefix, f"{name.replace('.', '_')}_{digest}"), "split": split, "source": source,
                "captions": [], "gold": {"columns": {c: json_value(r[c]) for c in tc.save_additional_columns}}
                if tc.save_additional_columns else {}}
        elif spec["split"] != split:
            raise DatasetError(f"{path}:{lineno}: image {image!r} is in split {split!r} here but in "
                               f"{spec['split']!r} on an earlier row")
        spec["captions"].append(r[tc.caption_col])
    yield from images.values()
