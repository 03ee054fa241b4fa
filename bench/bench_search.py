"""Vector search (pipeline.search.vectors): exact vs approximate FAISS indexes on clustered unit vectors.

    .venv/bin/python bench/bench_search.py [--sizes 100000,1000000] [--dim 256] [--kinds ivf,hnsw] [--queries 1000]

Per (N, kind): build seconds, single-query latency p50/p99 (one query per call, as a request would), batched
queries/s (--batch queries per call), and for the approximate kinds recall@10 against the exact index and
their p50 latency as a ratio of the exact one. Data: N unit vectors from a gaussian mixture (--per-cluster
points per centre, --spread noise norm relative to the unit centre; larger spread = less clustered, harder;
the defaults, 30 and 1.25, are about the hardest mixture on which IVF's default nprobe still reaches recall@10
0.95 at N=100k: with 100 per centre IVF is at ~1.0 even at nprobe 8, which would show nothing);
queries are database vectors plus noise of norm --noise, renormalised. HNSW builds slowly on few cores: at 1M
on 2 cores prefer --kinds ivf (the build column shows why). FAISS's OpenMP thread count is printed first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from densevse.pipeline.search import vectors

CHUNK = 65_536


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, per_cluster: int, spread: float, seed: int) -> np.ndarray:
    """(n, dim) float32 unit vectors around n // per_cluster random unit centres, generated CHUNK rows at a
    time so only the output is ever held whole."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // per_cluster), dim)))
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
        out[s:s + m] = unit(centres[rng.integers(len(centres), size=m)] + noise)
    return out


def noisy_queries(x: np.ndarray, q: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    rows = x[rng.integers(len(x), size=q)]
    return unit(rows + rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(noise / np.sqrt(x.shape[1])))


def measure(index: faiss.Index, queries: np.ndarray, k: int, batch: int) -> tuple[dict, np.ndarray]:
    """Latency of one query per call (p50/p99 ms), batched queries/s, and the batched result ids."""
    vectors.search(index, queries[:10], k)  # warm-up
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        vectors.search(index, q, k)
        lat.append(time.perf_counter() - t0)
    ids = []
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        ids.append(vectors.search(index, queries[s:s + batch], k)[1])
    batched = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1e3
    return {"p50_ms": round(float(np.percentile(lat_ms, 50)), 3), "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
            "qps_batched": round(len(queries) / batched, 1)}, np.concatenate(ids)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate index also returned."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated database sizes N")
    ap.add_argument("--dim", type=int, default=256, help="vector dimension (the model's embed_dim)")
    ap.add_argument("--kinds", default="ivf,hnsw", help="approximate kinds to compare with exact (ivf, hnsw)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1000, help="queries per call for the batched rate")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--per-cluster", type=int, default=30, help="database points per mixture centre")
    ap.add_argument("--spread", type=float, default=1.25, help="noise norm around a centre (centre norm 1)")
    ap.add_argument("--noise", type=float, default=0.1, help="noise norm added to a database vector per query")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if bad := [k for k in kinds if k not in ("ivf", "hnsw")]:
        ap.error(f"--kinds: {bad} not approximate kinds (ivf, hnsw)")

    print(f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}; dim {args.dim}, "
          f"{args.queries} queries, k={args.k}, {args.per_cluster}/cluster, spread {args.spread}, noise {args.noise}")
    print(f"{'N':>9} {'kind':5} {'build_s':>8} {'p50_ms':>8} {'p99_ms':>8} {'qps_batch':>10} {'recall@10':>9} "
          f"{'p50/exact':>9}  settings")
    rows = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        t0 = time.perf_counter()
        x = clustered(n, args.dim, args.per_cluster, args.spread, args.seed)
        queries = noisy_queries(x, args.queries, args.noise, args.seed)
        print(f"  (N={n}: data generated in {time.perf_counter() - t0:.1f} s)", flush=True)
        truth = exact_p50 = None
        for kind in ["flat", *kinds]:
            t0 = time.perf_counter()
            index = vectors.build(x, kind, seed=args.seed)
            row = {"n": n, "kind": kind, "build_s": round(time.perf_counter() - t0, 2)}
            stats, ids = measure(index, queries, args.k, args.batch)
            row.update(stats)
            if kind == "flat":
                truth, exact_p50 = ids, stats["p50_ms"]
            else:
                row["recall@10"] = round(recall(ids, truth), 4)
                row["p50_vs_exact"] = round(stats["p50_ms"] / exact_p50, 4)
            row["index"] = vectors.describe(index)
            del index
            rows.append(row)
            settings = {k: v for k, v in row["index"].items() if k not in ("kind", "n", "dim")}
            print(f"{n:9d} {kind:5} {row['build_s']:8.2f} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} "
                  f"{row['qps_batched']:10.1f} {row.get('recall@10', 1.0):9.4f} {row.get('p50_vs_exact', 1.0):9.4f}  "
                  f"{settings or ''}", flush=True)
        del x
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "omp_threads": faiss.omp_get_max_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
