"""Train and evaluate HM-LSTM and the two baselines on the same shards; print the retrieval/grounding table.

    python bench/compare_models.py pipeline.yaml -s train.epochs=10            # shards from `densevse preprocess`
    python bench/compare_models.py pipeline.yaml --models hmlstm dvsa -s train.epochs=3

Every model sees the same config except train.model (and its registered MLflow name, densevse-<model>).
Results go to <run.output_dir>/compare_models.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def table(rows: list[dict]) -> str:
    cols = [("model", "model", "{}"), ("i2t R@1", "i2t_r1", "{:.1f}"), ("R@5", "i2t_r5", "{:.1f}"),
            ("R@10", "i2t_r10", "{:.1f}"), ("medr", "i2t_medr", "{:.0f}"), ("t2i R@1", "t2i_r1", "{:.1f}"),
            ("R@5", "t2i_r5", "{:.1f}"), ("R@10", "t2i_r10", "{:.1f}"), ("medr", "t2i_medr", "{:.0f}"),
            ("rsum", "rsum", "{:.1f}"), ("ground %", "grounding_acc", "{:.1f}"), ("train s", "train_seconds", "{:.0f}")]
    fmt = lambda r, k, f: f.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r, k, f) for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from densevse.pipeline.config import load_config
    from densevse.pipeline.evaluation.retrieval import evaluate
    from densevse.pipeline.training.tasks import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="pipeline.yaml")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--models", nargs="+", default=["hmlstm", "vse", "dvsa"])
    ap.add_argument("--split", default=None, help="evaluation split (default eval.split)")
    args = ap.parse_args(argv)

    rows = []
    for m in args.models:
        cfg = load_config(args.config, args.overrides + [f"train.model={m}"])
        cfg.mlflow.registered_model = cfg.mlflow.registered_model.replace("hmlstm", m)
        t0 = time.time()
        s = train(cfg)
        r = evaluate(cfg, split=args.split)
        r.update(train_seconds=time.time() - t0, best_epoch=s["best_epoch"], epochs=s["epochs"],
                 val_rsum=s["best"].get("val_rsum"))
        rows.append(r)
        print(f"\n{m}: {json.dumps(r)}", flush=True)
    print(f"\nsplit={rows[0]['split']}  images={rows[0]['n_images']}  captions={rows[0]['n_captions']}  "
          f"chance R@1={rows[0]['chance_r1']:.2f}%  grounding chance={rows[0].get('grounding_chance', float('nan')):.1f}%")
    print(table(rows))
    out = Path(cfg.run.output_dir) / "compare_models.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
