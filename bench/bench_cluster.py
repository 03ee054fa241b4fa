"""Preprocessing throughput: one Ray node vs a 3-node local cluster with the same total CPUs.

    .venv/bin/python bench/bench_cluster.py [--images 240] [--cpus 2] [--repeats 1]

Both layouts are started by cluster/local.sh and get the same job through the Jobs API (densevse submit):
  1 node : a head with --cpus CPUs (driver and tasks on one raylet)
  3 nodes: a head with 0 CPUs (driver only) + 2 workers with --cpus/2 CPUs each
so the ratio isolates what the multi-node layout costs (object transfers between raylets, cross-node
scheduling), not extra compute. Throughput = planned samples / the preprocess step's own seconds
(summary.json: plan + Ray Data run + manifest; cluster start and code upload excluded). Regions and parse use
the gold annotations, features the EfficientNet actor. The nodes share this machine's cores, so this measures
overhead, not scale-out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from densevse.pipeline import jobs  # noqa: E402
from densevse.cluster.local import local_cluster  # noqa: E402


def run_layout(name: str, layout: dict, overrides: list[str], out: Path, repeats: int) -> dict:
    rates = []
    with local_cluster(**layout) as c:
        for r in range(repeats):
            run_dir = out / f"{name.replace(' ', '')}-{r}"
            t0 = time.time()
            job = jobs.submit(ROOT / "pipeline.yaml", overrides + [f"run.output_dir={run_dir}"], address=c.dashboard,
                              command="preprocess")
            status = jobs.follow(c.dashboard, job, timeout=1800, out=None)
            if status != "SUCCEEDED":
                raise RuntimeError(f"{name}: job {job} {status}:\n{jobs.client(c.dashboard).get_job_logs(job)[-3000:]}")
            s = json.loads((run_dir / "shards" / "summary.json").read_text())
            rates.append({"samples": s["samples"], "seconds": s["seconds"], "samples_per_s": s["samples"] / s["seconds"],
                          "job_wall_s": round(time.time() - t0, 1)})
            print(f"{name}: {rates[-1]}", flush=True)
    best = max(rates, key=lambda x: x["samples_per_s"])
    return {"layout": layout, "runs": rates, "samples_per_s": best["samples_per_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240, help="synthetic images (a third held out as test)")
    ap.add_argument("--cpus", type=int, default=2, help="total CPUs of each layout (even)")
    ap.add_argument("--samples-per-shard", type=int, default=20)
    ap.add_argument("--input-size", type=int, default=128, help="feature backbone input side")
    ap.add_argument("--repeats", type=int, default=1, help="runs per layout (the best counts)")
    args = ap.parse_args(argv)
    overrides = [f"dataset.synthetic.num_images={args.images}", f"dataset.synthetic.test_images={args.images // 3}",
                 f"shards.samples_per_shard={args.samples_per_shard}",
                 f"stages.features.params.input_size={args.input_size}", "stages.features.params.threads=1",
                 # one feature actor in both layouts: the same work; on two 1-CPU nodes only one actor leaves a
                 # node free for the 1-CPU tasks (pipeline.preprocess.actor_pool_sizes)
                 "stages.features.concurrency=1",
                 # gold boxes/trees: the model stages that remain (features) stand for the others; Detectron2 and
                 # Stanza would only scale every figure down alike (bench_regions.py measures them)
                 "stages.regions.impl=gold_boxes", "stages.regions.params={}", "stages.parse.impl=gold_trees",
                 "stages.parse.params={}"]
    layouts = {"1 node": dict(workers=0, head_cpus=args.cpus),
               "3 nodes": dict(workers=2, head_cpus=0, worker_cpus=args.cpus // 2)}
    with tempfile.TemporaryDirectory(prefix="densevse-bench-cluster-") as tmp:
        res = {name: run_layout(name, lay, overrides, Path(tmp), args.repeats) for name, lay in layouts.items()}
    one, three = res["1 node"]["samples_per_s"], res["3 nodes"]["samples_per_s"]
    print(f"\npreprocessing, {args.images} images, {args.cpus} CPUs in total")
    print(f"  1 node : {one:7.2f} samples/s")
    print(f"  3 nodes: {three:7.2f} samples/s")
    print(f"  3-node / 1-node throughput: {three / one:.2f}  (cluster overhead {100 * (1 - three / one):+.0f}%)")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
