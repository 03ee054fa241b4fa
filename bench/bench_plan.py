"""The plan step at scale: driver peak RSS and time, the in-memory plan (before) vs the streamed Parquet plan.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_plan.py [--samples 1000000,10000000] [--old-max 1000000]

A generated table of N samples (Flickr30k-like: shuffled keys, 90/5/5 splits, 5 captions of ~12 words, no gold)
is written once as Parquet and streamed as sample specs into each variant, each in its own process (so the peak
RSS, /proc/self/status VmHWM, is that variant's driver alone; Ray's workers are other processes):

- old: `plan()` of the commit before the streamed plan (`git show OLD_COMMIT:pipeline/preprocess/plan.py`,
  imported as a temp module) and the lines of that commit's run.py that hand the rows to the stages (group by
  shard, pickle, `ray.data.from_items`);
- new: `plan.write_plan` (Parquet under the output dir) and `run.shard_dataset` (one (file, row group) item
  per shard; the rows are read and built on the workers).

"Run the plan step" = up to the rows handed to the stages: a no-op stage (importing the project, as real stages
do) counts the rows of each shard through Ray Data (local Ray, 2 CPUs), and the counts are checked against the
plan. Ray start is excluded from the time (not from the RSS). The old variant only runs up to --old-max samples:
it holds every row in the driver.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "2daa45d"  # the last commit with the in-memory plan
PER_SHARD = 256


def make_table(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(3000)]
    pool = pa.array([" ".join(rng.choice(words, 12)) for _ in range(20000)])
    perm = rng.permutation(n)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("key", pa.string()), ("split", pa.string()), ("source", pa.string()),
                                          ("captions", pa.list_(pa.string()))])) as w:
        for a in range(0, n, 1_000_000):
            ids = perm[a:a + 1_000_000]
            keys = [f"flickr_{i:010d}" for i in ids]
            split = np.array(["train", "val", "test"])[np.searchsorted([0.9, 0.95], rng.random(len(ids)))]
            caps = pool.take(pa.array(rng.integers(0, len(pool), 5 * len(ids))))
            w.write_table(pa.table({"key": keys, "split": split.tolist(),
                                    "source": [f"/data/flickr/images/{k}.jpg" for k in keys],
                                    "captions": pa.ListArray.from_arrays(pa.array(range(0, 5 * len(ids) + 1, 5),
                                                                                  pa.int32()), caps)}))
    tmp.replace(path)


def specs(path: Path):
    """The table as sample specs, streamed (what a dataset reader yields)."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(65536):
        for r in batch.to_pylist():
            yield {"key": r["key"], "split": r["split"], "source": r["source"], "captions": r["captions"], "gold": {}}


def _count(batch):
    """The no-op stage. It imports the project, as every real stage's worker does (pipeline.preprocess.run, ~7 s
    with torch): the new path's plan reader lives there, and the old path must not look faster for skipping it."""
    import densevse.pipeline.preprocess.run  # noqa: F401

    return {"shard": batch["shard"], "n": [len(pickle.loads(p)) for p in batch["rows"]]}


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def child(variant: str, table: Path, out: Path) -> dict:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.time()
    if variant == "old":
        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:pipeline/preprocess/plan.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        mod_path = Path(tempfile.mkdtemp()) / "old_plan.py"
        mod_path.write_text(src)
        spec = importlib.util.spec_from_file_location("old_plan", mod_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        old.read_dataset = lambda *_: specs(table)
        from densevse.pipeline.config import load_config

        rows = old.plan(load_config(None, [f"shards.samples_per_shard={PER_SHARD}", f"run.output_dir={out}"]))
        planned: dict[str, int] = {}
        for r in rows:  # old run.py: planned, then the pending rows grouped by shard, pickled, from_items
            planned[r["shard"]] = planned.get(r["shard"], 0) + 1
        t_plan = time.time() - t0
        by_shard: dict[str, list[dict]] = {}
        for r in rows:
            by_shard.setdefault(r["shard"], []).append(r)
        items = [{"shard": s, "rows": pickle.dumps(rs, protocol=pickle.HIGHEST_PROTOCOL)} for s, rs in by_shard.items()]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
    else:
        from densevse.pipeline.preprocess.plan import write_plan
        from densevse.pipeline.preprocess.run import shard_dataset

        infos = write_plan(specs(table), PER_SHARD, out / "plan")
        planned = {i["shard"]: i["n"] for i in infos}
        t_plan = time.time() - t0
        ds = shard_dataset(ray, out / "plan", infos)
    counted = {r["shard"]: r["n"] for r in ds.map_batches(_count, batch_size=1, batch_format="numpy").take_all()}
    assert counted == planned, "rows per shard differ from the plan"
    return {"variant": variant, "samples": sum(planned.values()), "shards": len(planned), "plan_s": round(t_plan, 1),
            "total_s": round(time.time() - t0, 1), "driver_peak_rss_mib": round(_peak_rss_mib())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="1000000,10000000", help="comma-separated table sizes")
    ap.add_argument("--old-max", type=int, default=1_000_000, help="largest table the old in-memory plan gets")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_plan"))
    ap.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.table, args.out)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for n in [int(x) for x in args.samples.split(",")]:
        table = args.out / f"table-{n}.parquet"
        if not table.exists():
            t0 = time.time()
            make_table(table, n)
            print(f"table of {n} samples generated in {time.time() - t0:.0f} s ({table.stat().st_size >> 20} MiB)")
        for variant in ("old", "new"):
            if variant == "old" and n > args.old_max:
                print(json.dumps({"variant": "old", "samples": n, "skipped": f"over --old-max {args.old_max}"}))
                continue
            r = subprocess.run([sys.executable, __file__, "--child", variant, "--table", str(table), "--out",
                                str(args.out / f"run-{variant}-{n}")], capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if r.returncode == 0 and lines else
                  json.dumps({"variant": variant, "samples": n, "failed": r.returncode, "stderr": r.stderr[-800:]}),
                  flush=True)


if __name__ == "__main__":
    main()
