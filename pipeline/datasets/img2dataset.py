"""img2dataset's webdataset output: `<shard>.tar` (per sample `<key>.jpg` + `.txt` caption + `.json`),
`<shard>.parquet` (one row per input row: key, url, caption, status, error_message, ...) and
`<shard>_stats.json` (not needed: the parquet has each sample's status).

    dataset: {kind: img2dataset, root: data/laion_subset, img2dataset: {split: train}}

Samples come from the tars: source `<root>/<shard>.tar#<key>.jpg` (ingest reads that member: stages/fetch.py),
caption the `.txt` member. A sample img2dataset recorded as failed (status != "success" in the parquet) is not
dropped: it gets source `<root>/<shard>.parquet#<key>`, which ingest records as the rejection
"ingest: download failed in img2dataset: <its error_message>" (so `--retry-rejected "ingest: download"`, after
re-running img2dataset, redoes those shards). A sample the parquet calls a success but the tar lacks is
rejected by ingest as a missing member. Keys are `i2d_<img2dataset key>` (its keys are unique in one output
folder). `save_additional_columns` are read from the parquet into gold["columns"]. Shard files are taken from
root itself, not its subfolders; a folder with neither tars nor parquets is a DatasetError.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from densevse.pipeline.datasets.base import READERS, make_key
from densevse.pipeline.datasets.table import json_value
from densevse.pipeline.errors import DatasetError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format values
NEEDED = ("key", "status", "error_message", "caption")


def read_tar(path: Path) -> dict[str, dict[str, str | None]]:
    """key -> {"image": member name or None, "caption": the .txt member's text or None}, from the headers
    (and the small .txt members) only: the images are read later, by ingest."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:  # a Path or a UPath
            for m in tf:
                if m.isfile() and "." in m.name.rsplit("/", 1)[-1]:
                    base, ext = m.name.rsplit("/", 1)[-1].split(".", 1)  # webdataset: key up to the first dot
                    members.setdefault(base, {})[ext.lower()] = m
            out = {}
            for key, exts in members.items():
                image = next((exts[e].name for e in IMAGE_EXTS if e in exts), None)
                caption = None
                if "txt" in exts:
                    caption = tf.extractfile(exts["txt"]).read().decode("utf-8", "surrogateescape")
                out[key] = {"image": image, "caption": caption}
    except tarfile.TarError as e:
        raise DatasetError(f"{path}: not a readable tar file ({e})") from None
    return out


def read_metadata(path: Path, extra: list[str]) -> dict[str, dict]:
    """key -> its parquet row (NEEDED + extra columns); a column missing from the file is a DatasetError."""
    import pyarrow.parquet as pq

    try:
        with path.open("rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends: not a parquet file
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
    for col in [*NEEDED, *extra]:
        if col not in names:
            what = "a column img2dataset writes" if col in NEEDED else "dataset.img2dataset.save_additional_columns"
            raise DatasetError(f"{path}: no column {col!r} ({what}); its columns are {names}")
    with path.open("rb") as f:
        rows = pq.read_table(f, columns=list(dict.fromkeys([*NEEDED, *extra]))).to_pylist()
    return {str(r["key"]): r for r in rows}


@READERS.register("img2dataset")
def read_img2dataset(root: Path, cfg):
    ic = cfg.img2dataset
    stems = sorted({p.stem for p in root.glob("*.tar")} | {p.stem for p in root.glob("*.parquet")})
    if not stems:
        raise DatasetError(f"{root}: no img2dataset shards (<shard>.tar / <shard>.parquet)")
    for stem in stems:
        tar, meta_path = root / f"{stem}.tar", root / f"{stem}.parquet"
        in_tar = read_tar(tar) if tar.exists() else {}
        meta = read_metadata(meta_path, ic.save_additional_columns) if meta_path.exists() else {}
        if ic.save_additional_columns and not meta and in_tar:
            raise DatasetError(f"{meta_path}: missing; dataset.img2dataset.save_additional_columns reads it")
        for key in sorted(in_tar.keys() | meta.keys()):
            member, row = in_tar.get(key), meta.get(key)
            if member is None and row is not None and row["status"] != "success":
                source = f"{meta_path}#{key}"  # ingest: "download failed in img2dataset: <error_message>"
            else:
                source = f"{tar}#{(member or {}).get('image') or key + '.jpg'}"  # a missing one: rejected
            caption = (member or {}).get("caption")
            if caption is None and row is not None:
                caption = row["caption"]
            gold = {"columns": {c: json_value(row[c]) for c in ic.save_additional_columns}} if row and \
                ic.save_additional_columns else {}
            yield {"key": make_key("i2d", key.replace(".", "_")), "split": ic.split, "source": source,
                   "captions": [] if caption is None else [caption], "gold": gold}
