"""FAISS indexes over embedding vectors: build, search, save/load, describe, tune.

Scores are inner products. The model's embeddings are L2-normalised, so they are cosine similarities; this
module does not renormalise (a caller's scores stay exactly the inner products of what it passed).

Kinds:
  flat : exact (IndexFlatIP). Brute force, O(N*D) per query; the reference the approximate ones are measured
         against, and fast enough below EXACT_BELOW vectors.
  ivf  : IndexIVFFlat, k-means cells; a query scans the `nprobe` nearest cells. Cheap to build, memory ~ flat.
  hnsw : IndexHNSWFlat, a navigable graph. Fastest queries at high recall, slowest to build, more memory.
"""
from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from densevse.pipeline import storage

EXACT_BELOW = 100_000  # below this an exact scan costs a few ms per query: not worth an approximation
KINDS = ("auto", "flat", "ivf", "hnsw")
CHUNK = 65_536  # rows converted/checked/added at a time: 64 MiB of float32 at D=256
HNSW_M = 32
HNSW_EF_SEARCH = 128
MIN_PER_LIST = 39  # FAISS's own floor: k-means with fewer training points per centroid is unreliable
TRAIN_PER_LIST = 256  # FAISS's default cap; more training points per centroid barely move the centroids


def nlist_for(n: int) -> int:
    """IVF cells for n vectors: ~4*sqrt(n) (the usual balance of coarse vs fine scan cost), clamped to
    [1, n // 39] so k-means has at least 39 points per cell."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_PER_LIST))


def nprobe_for(nlist: int) -> int:
    """Default cells scanned per query: nlist/16, at least 16 (capped at nlist), so a query scans ~1/16 of
    the vectors. A fixed fraction rather than a fixed count because recall at fixed nprobe falls as N grows.

    Measured recall@10 against the exact index (D=256, gaussian-mixture unit vectors, queries = database
    vectors + noise of norm 0.1; bench/bench_search.py's data): 100 points per centre, spread 1.0-1.75:
    >= 0.99 at N=20k and 100k (>= 0.99 even at nprobe 8); 30 per centre, spread 1.25: 0.999 at 20k, 0.96 at
    100k (nprobe 79 of 1265); 30 per centre, spread 1.4 (neighbours spill out of their cluster): 0.88 at
    100k. On barely clustered data raise it with set_search_effort.
    """
    return min(nlist, max(16, nlist // 16))


def _rows(vectors) -> np.ndarray:
    v = np.asarray(vectors)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"vectors must be a non-empty 2-D (N, D) array, got shape {v.shape}")
    return v


def _chunk(v: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(v[start:start + CHUNK], dtype=np.float32)


def build(vectors: np.ndarray, kind: str = "auto", exact_below: int = EXACT_BELOW, seed: int = 0) -> faiss.Index:
    """An index of `vectors` (N, D), row i getting id i. "auto" is exact below `exact_below` rows, else IVF.

    Rows are converted to float32, checked and added CHUNK at a time, so a float64 or memory-mapped input is
    never copied whole. A non-finite row is rejected up front: FAISS would index it and return NaN scores.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    v = _rows(vectors)
    n, d = v.shape
    for s in range(0, n, CHUNK):
        bad = np.flatnonzero(~np.isfinite(_chunk(v, s)).all(axis=1))
        if bad.size:
            raise ValueError(f"vectors of shape {v.shape}: row {s + int(bad[0])} is not finite (NaN or inf)")
    if kind == "auto":
        kind = "flat" if n < exact_below else "ivf"

    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        nlist = nlist_for(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        m = min(n, TRAIN_PER_LIST * nlist)
        sample = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
        index.train(np.ascontiguousarray(v[sample], dtype=np.float32))
        index.nprobe = nprobe_for(nlist)
    for s in range(0, n, CHUNK):
        index.add(_chunk(v, s))
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, min(k, index.ntotal)), best first. A 1-D query is one row.

    An approximate index may find fewer than k' neighbours for a query: the rest are id -1 (score -inf for
    IVF). Shapes are checked here because FAISS reads a wrong-width array as garbage rather than failing.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ValueError(f"queries must be 1-D (D,) or 2-D (Q, D), got shape {q.shape}")
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} != index dimension {index.d}")
    if index.ntotal == 0:
        raise ValueError("the index is empty")
    return index.search(np.ascontiguousarray(q), min(k, index.ntotal))


def save(index: faiss.Index, path: str | Path) -> None:
    """Write `index` to `path` (FAISS's own format; IVF/HNSW keep their search settings)."""
    faiss.write_index(index, str(path))


def load(path) -> faiss.Index:
    """The index saved at `path` (a location: read as bytes, so one in object storage too). FAISS's own error
    for a missing file is a RuntimeError with a C++ trace."""
    path = storage.location(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    return faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))


def describe(index: faiss.Index) -> dict:
    """Kind, size and search settings: what a run log or a model card should record about an index."""
    out = {"n": int(index.ntotal), "dim": int(index.d)}
    if isinstance(index, faiss.IndexIVFFlat):
        return {"kind": "ivf", **out, "nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if isinstance(index, faiss.IndexHNSWFlat):
        return {"kind": "hnsw", **out, "M": int(index.hnsw.nb_neighbors(1)), "efSearch": int(index.hnsw.efSearch)}
    if isinstance(index, faiss.IndexFlat):
        return {"kind": "flat", **out}
    raise TypeError(f"not an index this module builds: {type(index).__name__}")


def set_search_effort(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Trade recall for speed on an approximate index: `nprobe` cells (IVF; capped at nlist) or `ef_search`
    candidates (HNSW). A setting for the other kind, or for an exact index, is a ValueError, not ignored."""
    kind = describe(index)["kind"]
    for name, value, applies in (("nprobe", nprobe, "ivf"), ("ef_search", ef_search, "hnsw")):
        if value is None:
            continue
        if kind != applies:
            raise ValueError(f"{name} applies to {applies} indexes, not {kind}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if nprobe is not None:
        index.nprobe = min(int(nprobe), int(index.nlist))
    if ef_search is not None:
        index.hnsw.efSearch = int(ef_search)
