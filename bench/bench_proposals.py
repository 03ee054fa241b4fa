"""Region proposals on held-out real photos: the detectors trained on COCO boxes vs a grid and the synthetic one.

    .venv/bin/python bench/bench_proposals.py [--root ../shared/data/coco-det --root ../shared/data/coco-mini]
        [--backbones efficientnet-lite0 efficientnet-lite2] [--threads 1] [--json out.json]

Trains (or reuses, by spec hash) `densevse regions train --dataset coco` for each backbone in its default dir
(.cache/detector-coco, .cache/detector-coco-lite2) and the synthetic detector (.cache/detector-synthetic),
then evaluates them all in this one run on the same held-out photos (coco-det/val2017: 128, never trained on):
class-agnostic recall at IoU 0.5 / 0.7 of the top 19 / 100 boxes and AR@100 (IoU 0.5:0.95), each detector
through the regions stage (score order, no score threshold), next to the sliding-window grid baseline (3
scales x 3 aspect ratios, coarse first, centre-out; pipeline/evaluation/proposals.py). Gold: every non-crowd
box. Prints the table (+ ratio to the grid), training times and the data report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from densevse.pipeline.evaluation.proposals import format_table  # noqa: E402
from densevse.pipeline.stage_models import detector as d  # noqa: E402

BACKBONES = ("efficientnet-lite0", "efficientnet-lite2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", dest="roots", action="append", default=None,
                    help=f"COCO root (repeatable; default {' '.join(d.COCO_DEFAULTS['roots'])})")
    ap.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    roots = args.roots or [str(ROOT / r) for r in d.COCO_DEFAULTS["roots"]]
    specs = {f"coco {b}": d.DetectorSpec(dataset="coco", roots=roots, backbone=b, threads=args.threads)
             for b in args.backbones}
    synthetic = ROOT / d.DEFAULT_DIR
    trained = {"synthetic detector": d.train(synthetic, d.DetectorSpec(threads=args.threads), quiet=True)}
    for name, spec in specs.items():
        print(f"{name}: training or reusing {ROOT / d.default_out(spec)} ...", flush=True)
        trained[name] = d.train(ROOT / d.default_out(spec), spec, quiet=True)
    data = d.read_coco(next(iter(specs.values())))
    dirs = {name: r["out"] for name, r in trained.items()}
    table = d.evaluate_holdout(data, dirs, threads=args.threads)
    rows = {name: table[name] for name in [*specs, "grid", "synthetic detector"]}

    print(f"\nheld-out real photos: {len(data.holdout)} ({specs[next(iter(specs))].holdout}), "
          f"{sum(len(x['annotations']) for x in data.holdout)} non-crowd gold boxes; top K by score\n")
    print(format_table(rows))
    print("\ntraining (Detectron2 DefaultTrainer, CPU):")
    for name, r in trained.items():
        batch = r.get("images_seen", 0) // max(r.get("iters") or 1, 1)
        print(f"  {name:<28} {r.get('train_s', '?')} s, {r.get('iters')} iters x {batch} images, "
              f"{r.get('threads')} threads{' (cached)' if r['cached'] else ''}")
    boxes = sum(len(x["annotations"]) for x in data.train)
    print(f"\ndata: {len(data.train)} training photos, {boxes} boxes; skipped / clipped:")
    for reason, n in sorted(data.report.items()):
        print(f"  {n:6d}  {reason}")
    if args.json:
        args.json.write_text(json.dumps({"table": rows, "training": trained, "holdout_images": len(data.holdout),
                                         "report": dict(data.report)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
