"""Preprocessing throughput (samples/s) on the synthetic set with Ray limited to 1 vs 2 CPUs.

    .venv/bin/python bench/bench_preprocess.py [--images 400] [--out /tmp/bench_pre]

Each run is a fresh `densevse preprocess` process (own local Ray, cold shard dir, the synthetic set generated
once beforehand and shared), pinned with its whole process tree (Ray's raylet, actors and tasks inherit the
affinity) to that many cores: Ray's `num_cpus` alone only limits scheduling, and a "1 CPU" run would still use
every core. Every stage asks for 0.25 CPU (three model stages + tasks must fit on 1 CPU), so
both runs use the same config apart from `ray.num_cpus` and the feature actor count (one per CPU).
Reported: wall seconds of the run, samples/s and the 2-vs-1 ratio with start-up included; start-up alone (Ray,
then actors loading models until the first shard is written); and the steady-state rate after the first shard.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, images: int, cpus: int, extra: list[str]) -> dict:
    shutil.rmtree(out / "shards", ignore_errors=True)
    sets = [f"run.output_dir={out}", f"dataset.synthetic.num_images={images}",
            f"dataset.synthetic.test_images={images // 4}", f"ray.num_cpus={cpus}",
            f"stages.features.concurrency={cpus}", *extra,
            *[f"stages.{s}.num_cpus=0.25" for s in ("ingest", "regions", "features", "parse")]]
    cmd = [sys.executable, "-m", "densevse.pipeline.cli", "preprocess", str(ROOT / "pipeline.yaml"), "--quiet"]
    for s in sets:
        cmd += ["-s", s]
    cores = sorted(os.sched_getaffinity(0))[:cpus]  # Ray's num_cpus is logical: pin the process tree as well
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   preexec_fn=lambda: os.sched_setaffinity(0, cores))
    wall = time.time() - t0
    summary = json.loads((out / "shards" / "summary.json").read_text())
    cost = summary.get("cost") or {}
    return {"cpus": cpus, "samples": summary["samples"], "wall_s": round(wall, 1),
            "samples_per_s": round(summary["samples"] / wall, 2),
            # start-up: Ray, then the actors loading their models until the first shard is written
            "startup_s": round(cost.get("ray_start_s", 0) + cost.get("first_shard_s", 0), 1),
            "steady_samples_per_s": cost.get("steady_samples_per_s"), "efficiency": cost.get("efficiency"),
            "cpu_s_per_image": cost.get("cpu_s_per_image")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--samples-per-shard", type=int, default=10, help="small shards: enough units of work for every actor")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_preprocess"))
    ap.add_argument("-s", "--set", dest="extra", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    from densevse.pipeline.config import SyntheticConfig
    from densevse.pipeline.datasets.synthetic import generate

    t0 = time.time()
    generate(args.out / "dataset", SyntheticConfig(num_images=args.images, test_images=args.images // 4))
    print(f"synthetic set: {args.images} images generated in {time.time() - t0:.1f}s")
    extra = [f"shards.samples_per_shard={args.samples_per_shard}", *args.extra]
    one = run(args.out, args.images, 1, extra)
    print(json.dumps(one))
    two = run(args.out, args.images, 2, extra)
    print(json.dumps(two))
    print(f"throughput 2 CPUs / 1 CPU = {two['samples_per_s'] / one['samples_per_s']:.2f}x with start-up "
          f"({one['startup_s']} s / {two['startup_s']} s), "
          f"{two['steady_samples_per_s'] / one['steady_samples_per_s']:.2f}x in steady state")


if __name__ == "__main__":
    main()
