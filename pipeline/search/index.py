"""Building a search index of a shard set (`densevse index`): every image, region, caption and phrase, embedded.

Layout (clip-retrieval's, plus the two dense levels):
    index.json                    the model that built it (checkpoint path + sha256, or the URI given; name,
                                  dim), counts, shards
    img_emb/img_emb_0.npy         (images, E) float32 image vectors, row i = metadata row i
    text_emb/text_emb_0.npy       (captions, E) sentence vectors, row j = captions row j
    region_emb/region_emb_0.npy   (regions, E) region vectors (detector boxes; not the whole-image row 0)
    phrase_emb/phrase_emb_0.npy   (phrases, E) phrase vectors
    metadata/metadata_0.parquet   per image: key, split, source, width, height, shard, jpg_offset, jpg_size
    captions.parquet              per caption: image (row), key, caption, text
    regions.parquet               per region: image (row), key, region (row in the sample's boxes), x0 y0 x1 y1
    phrases.parquet               per phrase: caption (row), image (row), key, start, end, label, text
    {image,text,region,phrase}.faiss   FAISS indexes (pipeline/search/vectors.py: exact below a size, else IVF)

The vectors come from the shards' stored features and trees (Embedder.encode_images/encode_captions), so
building needs no detector or parser; queries (query.py) run them on the new input. An image's JPEG stays in
its shard: metadata holds its byte range in the (uncompressed) tar, so a hit is drawn without a copy (a ranged
read for a shard in object storage). The index dir is a location too: in object storage it is built in a local
temporary dir and uploaded.
"""
from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from densevse.pipeline import storage
from densevse.pipeline.search import vectors

KINDS = {"image": "img_emb", "text": "text_emb", "region": "region_emb", "phrase": "phrase_emb"}
INDEX_JSON = "index.json"


def jpeg_ranges(tar_path) -> dict[str, tuple[int, int]]:
    """key -> (byte offset, size) of each sample's .jpg inside a tar (a location)."""
    with storage.location(tar_path).open("rb") as f, tarfile.open(fileobj=f) as t:
        return {m.name[:-4]: (m.offset_data, m.size) for m in t if m.name.endswith(".jpg")}


def read_jpeg(shard, offset: int, size: int) -> bytes:
    with storage.location(shard).open("rb") as f:
        f.seek(offset)
        return f.read(size)


def build(shard_dir, embedder, out, splits=("train", "val", "test"), exact_below: int = vectors.EXACT_BELOW,
          batch_images: int = 64, log=print) -> dict:
    """Embed every sample of `splits` and write the index to `out` (layout above). Returns index.json's dict."""
    from densevse.pipeline.shardset import iter_samples, shard_paths

    t0, shard_dir = time.time(), storage.location(shard_dir)
    tables = {k: [] for k in ("metadata", "captions", "regions", "phrases")}
    embs = {k: [] for k in KINDS}
    shards = [(split, p) for split in splits for p in shard_paths(shard_dir, split)]
    if not shards:
        raise FileNotFoundError(f"no finished shards of {list(splits)} in {shard_dir}")

    def flush(batch):
        for (s, split, tar, rng), e in zip(batch, embedder.encode_images([(s, []) for s, *_ in batch])):
            i = len(tables["metadata"])
            tables["metadata"].append({"key": s["key"], "split": split, "source": s["meta"].get("source", ""),
                                       "width": s["meta"].get("width", 0), "height": s["meta"].get("height", 0),
                                       "shard": str(tar.resolve()), "jpg_offset": rng[0], "jpg_size": rng[1]})
            embs["image"].append(e["image"][None])
            embs["region"].append(e["regions"])
            for r, box in enumerate(e["boxes"][1:], start=1):
                x0, y0, x1, y1 = map(float, box)
                tables["regions"].append({"image": i, "key": s["key"], "region": r,
                                          "x0": x0, "y0": y0, "x1": x1, "y1": y1})
            caps = [c for c in s["meta"]["captions"] if "tree" in c]
            for c, t in zip(caps, embedder.encode_captions(caps)):
                j = len(tables["captions"])
                tables["captions"].append({"image": i, "key": s["key"], "caption": int(c["index"]), "text": c["text"]})
                embs["text"].append(t["sentence"][None])
                embs["phrase"].append(t["phrases"])
                tables["phrases"] += [{"caption": j, "image": i, "key": s["key"], **sp} for sp in t["spans"]]

    for split, tar in shards:
        ranges, batch = jpeg_ranges(tar), []
        for s in iter_samples([tar]):
            batch.append((s, split, tar, ranges.get(s["key"], (0, 0))))
            if len(batch) == batch_images:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        log(f"indexed {tar.name}: {len(tables['metadata'])} images, {len(tables['captions'])} captions so far")

    info = {"model": embedder.identity, "shard_dir": str(shard_dir.resolve()), "splits": list(splits)}
    with storage.local(storage.location(out), download=False, upload=True) as d:
        info["counts"] = _save(d, tables, embs, embedder.dim, exact_below)
        info.update(seconds=round(time.time() - t0, 2), built=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (d / INDEX_JSON).write_text(json.dumps(info, indent=1))  # last: an index without it is not opened
    return info


def _save(out: Path, tables: dict, embs: dict, dim: int, exact_below: int) -> dict:
    """The vectors, FAISS indexes and tables under the local dir `out`; returns the counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for kind, folder in KINDS.items():
        mat = np.concatenate(embs[kind]).astype(np.float32) if embs[kind] else np.zeros((0, dim), np.float32)
        (out / folder).mkdir(exist_ok=True)
        np.save(out / folder / f"{folder}_0.npy", mat)
        counts[kind] = len(mat)
        if len(mat):
            index = vectors.build(mat, exact_below=exact_below)
            vectors.save(index, out / f"{kind}.faiss")
            counts[f"{kind}_index"] = vectors.describe(index)
    (out / "metadata").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(tables["metadata"]), out / "metadata" / "metadata_0.parquet")
    for name in ("captions", "regions", "phrases"):
        pq.write_table(_table(tables[name], name), out / f"{name}.parquet")
    return counts


_EMPTY = {"captions": {"image": pa.int64(), "key": pa.string(), "caption": pa.int64(), "text": pa.string()},
          "regions": {"image": pa.int64(), "key": pa.string(), "region": pa.int64(), "x0": pa.float64(),
                      "y0": pa.float64(), "x1": pa.float64(), "y1": pa.float64()},
          "phrases": {"caption": pa.int64(), "image": pa.int64(), "key": pa.string(), "start": pa.int64(),
                      "end": pa.int64(), "label": pa.string(), "text": pa.string()}}


def _table(rows: list[dict], name: str) -> pa.Table:
    """Rows as a table; an empty one keeps its columns (a set with no detector boxes has no regions)."""
    return pa.Table.from_pylist(rows) if rows else pa.schema(list(_EMPTY[name].items())).empty_table()
