"""pipeline.search.vectors: exact results, the auto threshold, approximate recall, save/load, input errors."""
from __future__ import annotations

import numpy as np
import pytest

from densevse.pipeline.search import vectors

DIM = 64


def clustered(n: int, dim: int = DIM, clusters: int = 50, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    """Unit vectors from a gaussian mixture: true neighbours exist, so recall measures something (uniform
    random vectors in 64-D are all about equally far apart)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] / np.sqrt(dim) + spread / np.sqrt(dim) * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def queries_near(x: np.ndarray, q: int = 100, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = x[rng.integers(len(x), size=q)] + 0.1 / np.sqrt(x.shape[1]) * rng.standard_normal((q, x.shape[1]))
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5,000 clustered vectors, 100 queries near them, and the exact top-10 ids."""
    x = clustered(5000)
    q = queries_near(x)
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    return x, q, truth


def test_exact_is_brute_force(data):
    x, q, truth = data
    scores, ids = vectors.search(vectors.build(x, "flat"), q, 10)
    assert ids.shape == scores.shape == (len(q), 10)
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth, axis=1), rtol=1e-5, atol=1e-6)


def test_auto_is_flat_below_threshold_and_ivf_above(data):
    x, q, truth = data
    small = vectors.build(x[:999], exact_below=1000)
    assert vectors.describe(small) == {"kind": "flat", "n": 999, "dim": DIM}
    ivf = vectors.build(x, exact_below=1000)
    info = vectors.describe(ivf)
    assert info == {"kind": "ivf", "n": 5000, "dim": DIM, "nlist": vectors.nlist_for(5000),
                    "nprobe": vectors.nprobe_for(vectors.nlist_for(5000))}
    assert recall_at(vectors.search(ivf, q, 10)[1], truth) >= 0.9
    assert vectors.describe(vectors.build(x))["kind"] == "flat"  # the default threshold is 100,000


def test_nlist_keeps_39_points_per_list():
    assert vectors.nlist_for(1) == 1
    assert vectors.nlist_for(5000) == 5000 // 39
    assert vectors.nlist_for(1_000_000) == 4000
    assert all(n // vectors.nlist_for(n) >= 39 for n in (39, 100, 5000, 77_777))


def test_hnsw_recall(data):
    x, q, truth = data
    index = vectors.build(x, "hnsw")
    assert vectors.describe(index) == {"kind": "hnsw", "n": 5000, "dim": DIM, "M": 32, "efSearch": 128}
    assert recall_at(vectors.search(index, q, 10)[1], truth) >= 0.9


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(data, tmp_path, kind):
    x, q, _ = data
    index = vectors.build(x[:2000], kind)
    if kind == "ivf":
        vectors.set_search_effort(index, nprobe=7)
    vectors.save(index, tmp_path / "i.faiss")
    back = vectors.load(str(tmp_path / "i.faiss"))
    assert vectors.describe(back) == vectors.describe(index)
    for a, b in zip(vectors.search(index, q, 10), vectors.search(back, q, 10)):
        np.testing.assert_array_equal(a, b)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.faiss"):
        vectors.load(tmp_path / "nope.faiss")


def test_set_search_effort(data):
    x, _, _ = data
    ivf, hnsw = vectors.build(x[:2000], "ivf"), vectors.build(x[:2000], "hnsw")
    vectors.set_search_effort(ivf, nprobe=3)
    vectors.set_search_effort(hnsw, ef_search=64)
    assert vectors.describe(ivf)["nprobe"] == 3 and vectors.describe(hnsw)["efSearch"] == 64
    vectors.set_search_effort(ivf, nprobe=10**6)
    assert vectors.describe(ivf)["nprobe"] == vectors.describe(ivf)["nlist"]
    with pytest.raises(ValueError, match="ef_search applies to hnsw indexes, not ivf"):
        vectors.set_search_effort(ivf, ef_search=10)
    with pytest.raises(ValueError, match="nprobe applies to ivf indexes, not flat"):
        vectors.set_search_effort(vectors.build(x[:10]), nprobe=10)


def test_k_above_n_returns_n_and_1d_query_is_one_row(data):
    x, q, _ = data
    scores, ids = vectors.search(vectors.build(x[:5]), q[0], 10)
    assert scores.shape == ids.shape == (1, 5)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]
    assert np.all(np.diff(scores[0]) <= 0)


def test_float64_input_is_converted(data):
    x, q, truth = data
    _, ids = vectors.search(vectors.build(x.astype(np.float64), "flat"), q.astype(np.float64), 10)
    np.testing.assert_array_equal(ids, truth)


class NotFaiss:
    """Stands in for an index: reaching .search means the query was handed to FAISS unchecked."""
    d, ntotal = DIM, 10

    def search(self, *args):
        raise AssertionError("FAISS was called")


def test_input_errors(data):
    x, q, _ = data
    index = vectors.build(x[:100])
    with pytest.raises(ValueError, match=f"query dimension 16 != index dimension {DIM}"):
        vectors.search(index, q[:, :16], 5)
    with pytest.raises(ValueError, match=f"query dimension 16 != index dimension {DIM}"):
        vectors.search(NotFaiss(), q[:, :16], 5)
    with pytest.raises(ValueError, match=r"k must be >= 1, got 0"):
        vectors.search(index, q, 0)
    with pytest.raises(ValueError, match=r"got shape \(0, 8\)"):
        vectors.build(np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got shape \(8,\)"):
        vectors.build(np.zeros(8, dtype=np.float32))
    bad = x[:10].copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"shape \(10, 64\): row 3 is not finite"):
        vectors.build(bad)
    with pytest.raises(ValueError, match="unknown index kind 'annoy'; valid kinds: auto, flat, ivf, hnsw"):
        vectors.build(x, "annoy")

