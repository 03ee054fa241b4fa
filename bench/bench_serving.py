"""Using a trained model: index build rate, in-process query latency, and REST requests/s for text queries.

    .venv/bin/python bench/bench_serving.py --run runs/default [--tracking-uri URI] [--requests 200] [--clients 4]

1. `densevse index` of the run's shards with its best checkpoint (a fresh process, so model loading counts):
   items (images + regions + captions + phrases) per second, from the command's own figure and its wall time.
2. In-process `Index.images(text)` and `Index.regions(phrase)`: p50/p99 latency (parse + embed + FAISS).
3. With --tracking-uri (a registry holding densevse-hmlstm@champion): a real `mlflow models serve` process,
   then --requests POSTs of one caption each from --clients threads: requests/s and p50/p99 latency.
Figures are printed, never asserted; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red circle left of a blue square", "a green triangle above a yellow star", "a blue square",
           "a small red circle", "a yellow star right of a green circle"]


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def bench_index(run: Path, out: Path) -> dict:
    model = next((run / "models").glob("*/best.pt"))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "densevse.pipeline.cli", "index", "--shards", str(run / "shards"), "--model",
                        str(model), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.time() - t0
    info = json.loads(r.stdout)
    items = sum(info["counts"][k] for k in ("image", "region", "text", "phrase"))
    return {"items": items, "build_s": info["seconds"], "items_per_s": items / info["seconds"], "wall_s": wall,
            "items_per_s_wall": items / wall}


def bench_queries(index_dir: Path, n: int, config: Path) -> dict:
    from densevse.pipeline.config import load_config
    from densevse.pipeline.search.query import Index

    # the query stages take their model files from the user's own config, never from the checkpoint's
    ix = Index.open(index_dir, stages=load_config(config).stages)
    ix.images(QUERIES[0], 10)  # first query loads the parser
    out = {}
    for kind, fn in (("images", ix.images), ("regions", ix.regions)):
        lat = []
        for i in range(n):
            t = time.perf_counter()
            fn(QUERIES[i % len(QUERIES)], 10)
            lat.append(time.perf_counter() - t)
        out[kind] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "qps": n / sum(lat)}
    return out


def bench_rest(uri: str, requests: int, clients: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from densevse.pipeline.tracking.server import free_port

    from densevse.pipeline.serving import rest

    t0 = time.time()
    proc, url = rest.start("models:/densevse-hmlstm@champion", uri, free_port(), Path(tempfile.mkdtemp()) / "serve.log")
    try:
        startup = time.time() - t0

        def post(text):
            body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[text]]}}).encode()
            req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
            return time.perf_counter() - t

        post(QUERIES[0])  # warm: the parser loads on the first text row
        lat, lock = [], threading.Lock()

        def client(c):
            for i in range(c, requests, clients):
                dt = post(QUERIES[i % len(QUERIES)])
                with lock:
                    lat.append(dt)

        t0 = time.time()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        return {"startup_s": startup, "requests": len(lat), "clients": clients, "requests_per_s": len(lat) / wall,
                "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    finally:
        rest.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run's output_dir (shards + models)")
    ap.add_argument("--config", type=Path, default=ROOT / "pipeline.yaml", help="the stages queries run (model files)")
    ap.add_argument("--tracking-uri", default=None, help="registry with densevse-hmlstm@champion (REST part)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        res["index"] = bench_index(a.run.resolve(), Path(tmp) / "index")
        print(f"index build: {res['index']['items']} items in {res['index']['build_s']:.1f} s = "
              f"{res['index']['items_per_s']:.0f} items/s (whole process {res['index']['wall_s']:.1f} s = "
              f"{res['index']['items_per_s_wall']:.0f} items/s)")
        res["queries"] = bench_queries(Path(tmp) / "index", a.queries, a.config)
        for kind, r in res["queries"].items():
            print(f"in-process {kind:8s} query: p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                  f"{r['qps']:.1f} queries/s")
    if a.tracking_uri:
        res["rest"] = r = bench_rest(a.tracking_uri, a.requests, a.clients)
        print(f"REST text queries ({r['clients']} clients): {r['requests_per_s']:.1f} requests/s, p50 "
              f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (server start {r['startup_s']:.1f} s)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
