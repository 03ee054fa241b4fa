"""A resume's check of finished shards: every tar hashed (before; now `--verify`) vs trusting each tar's size
and mtime / ETag against its stats (now the default), on a local dir and on S3 (a real moto server on 127.0.0.1).

    .venv/bin/python bench/bench_resume.py [--shards 100] [--shard-mb 2] [--repeats 3]

N shards of `--shard-mb` MB each (10 samples of random JPEG-sized bytes: hashing cost is per byte) are written
once with the real `shardset.write_shard`, then `shardset.finished_shards` is timed both ways, alternately, each
`--repeats` times; the minimum is printed with the bytes read. On S3 the full hash downloads the whole set.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_set(shard_dir, n: int, shard_mb: float) -> dict[str, str]:
    """n shards with stats, as preprocess writes them; returns the plan's {shard: keys_sha256}."""
    import numpy as np

    from densevse.pipeline import shardset
    from densevse.stages.base import empty_row, npy_bytes

    rng = np.random.default_rng(0)
    per = int(shard_mb * 2**20 / 10)
    planned = {}
    for s in range(n):
        name = shardset.shard_name("train", s)
        rows = [empty_row(key=f"k{s:05d}_{i}", split="train", shard=name, source="bench",
                          image=rng.bytes(per), width=1, height=1, captions='[{"index": 0, "text": "x"}]',
                          boxes=npy_bytes(np.zeros((1, 4), np.float32)), feats=npy_bytes(np.zeros((1, 8), np.float16)))
                for i in range(10)]
        shardset.write_shard(rows, shard_dir, name, {"sha256": "bench", "components": {}})
        planned[name] = shardset.keys_sha256([r["key"] for r in rows])
    return planned


def time_both(shard_dir, planned: dict, repeats: int) -> dict[str, float]:
    from densevse.pipeline import shardset

    best = {"hash every tar (before; --verify)": float("inf"), "size + mtime/ETag (now)": float("inf")}
    for _ in range(repeats):
        for label, verify in zip(best, (True, False)):
            t = time.perf_counter()
            done = shardset.finished_shards(shard_dir, planned, verify=verify)
            best[label] = min(best[label], time.perf_counter() - t)
            assert len(done) == len(planned), (label, len(done))
    return best


def moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return proc, endpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--shard-mb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    a = ap.parse_args()
    total = a.shards * a.shard_mb
    print(f"resume check of {a.shards} finished shards, {total:.0f} MB in all (best of {a.repeats})")
    with tempfile.TemporaryDirectory(prefix="densevse-bench-resume-") as d:
        places = [("local", Path(d) / "shards")]
        proc = None
        if not a.no_s3:
            proc, _ = moto()
            places.append(("s3 (moto)", "s3://bench/shards"))
        try:
            for where, shard_dir in places:
                planned = write_set(shard_dir, a.shards, a.shard_mb)
                best = time_both(shard_dir, planned, a.repeats)
                (old, t_old), (new, t_new) = best.items()
                print(f"{where:10s} {old}: {t_old:7.2f} s ({total:.0f} MB read) | {new}: {t_new:6.2f} s "
                      f"(0 MB read) | {t_old / max(t_new, 1e-9):.1f}x")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
