"""HM-LSTM against its two baselines (VSE, DVSA) on the same shards and config, over several seeds: retrieval on
the evaluation split, as mean +- std, every run tracked in MLflow under one parent run that holds the table.

    python bench/compare_models.py pipeline.real.yaml --seeds 3 -s dataset.root=../shared/data/flickr8k \\
        -s run.output_dir=runs/f8k -s mlflow.tracking_uri=sqlite:///runs/f8k/mlflow.db
    python bench/compare_models.py pipeline.yaml --models hmlstm dvsa --seeds 1 -s train.epochs=3

Every run sees the same config except `train.model` and `train.seed` (and its own output dir,
<run.output_dir>/compare/<model>-seed<N>, so best.pt files do not overwrite each other); the shards are the
config's (`shards.dir`, default <run.output_dir>/shards): preprocess them first. A run already finished (its
evaluation saved) is reused, so the command resumes. Writes <run.output_dir>/compare/compare_models.{json,md}
and, with tracking on, logs both as artifacts of a parent MLflow run whose children are the training runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "rsum")
HEADER = ("model", "i2t R@1", "R@5", "R@10", "Med r", "t2i R@1", "R@5", "R@10", "Med r", "rsum")
# Published Flickr8K rows (1,000 test images, 5 captions each): R@1 / R@5 / R@10 / Med r, caption retrieval
# (image -> text) then image retrieval (text -> image); "-" where not given here (rsum: the sum of the six).
PUBLISHED = {
    "HM-LSTM (Niu et al. 2017)": ("27.7", "-", "68.6", "-", "24.4", "-", "68.1", "-", "-"),
    "DVSA (Karpathy & Fei-Fei 2015)": ("16.5", "40.6", "54.2", "-", "11.8", "32.1", "44.7", "-", "199.9"),
}


def summarize(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """model -> metric -> (mean, std over seeds; std 0 for one seed)."""
    out: dict = {}
    for model in dict.fromkeys(r["model_key"] for r in rows):
        runs = [r for r in rows if r["model_key"] == model]
        out[model] = {m: (statistics.fmean(r[m] for r in runs),
                          statistics.stdev([r[m] for r in runs]) if len(runs) > 1 else 0.0) for m in METRICS}
        out[model]["seeds"] = (len(runs), 0.0)
    return out


def table(summary: dict) -> str:
    """A markdown table: ours as mean +- std over seeds, then the published rows."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for model, s in summary.items():
        cells = [f"{s[m][0]:.1f} ± {s[m][1]:.1f}" if not m.endswith("medr") else f"{s[m][0]:.1f}" for m in METRICS]
        lines.append(f"| {model} (ours, {int(s['seeds'][0])} seeds) | " + " | ".join(cells) + " |")
    for name, cells in PUBLISHED.items():
        lines.append(f"| {name}, published | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(summary: dict, ours: str = "hmlstm") -> str:
    """Does HM-LSTM beat both baselines on R@1 in both directions by more than one std (the larger of the two)?"""
    if ours not in summary:
        return "no HM-LSTM runs"
    parts = []
    for other in (m for m in summary if m != ours):
        for d in ("i2t_r1", "t2i_r1"):
            (a, sa), (b, sb) = summary[ours][d], summary[other][d]
            margin = max(sa, sb)
            parts.append(f"{d} {a:.1f} vs {other} {b:.1f}: {'wins' if a - b > margin else 'does not win'} "
                         f"(difference {a - b:+.1f}, one std {margin:.1f})")
    return "; ".join(parts)


def run_one(config: str, overrides: list[str], model: str, seed: int, base: Path, parent: str | None) -> dict:
    """Train and evaluate one (model, seed) in its own output dir; reuse a finished one."""
    from densevse.pipeline.config import load_config
    from densevse.pipeline.evaluation.retrieval import evaluate
    from densevse.pipeline.training.tasks import train

    out = base / "compare" / f"{model}-seed{seed}"
    done = out / "evaluation.json"
    if done.is_file():
        return json.loads(done.read_text())
    probe = load_config(config, overrides)
    cfg = load_config(config, overrides + [f"train.model={model}", f"train.seed={seed}", f"run.output_dir={out}",
                                           f"shards.dir={probe.shard_dir}", f"run.name={probe.run.name}-{model}-s{seed}",
                                           f"mlflow.registered_model=densevse-{model}"])
    t0 = time.time()
    s = train(cfg)
    if parent and s.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        MlflowClient(cfg.mlflow.tracking_uri).set_tag(s["mlflow_run_id"], "mlflow.parentRunId", parent)
    r = evaluate(cfg)
    r.update(model_key=model, seed=seed, train_seconds=round(time.time() - t0, 1), best_epoch=s["best_epoch"],
             epochs=s["epochs"], val_rsum=s["best"].get("val_rsum"), mlflow_run_id=s.get("mlflow_run_id"))
    done.write_text(json.dumps(r, indent=1))
    return r


def main(argv=None) -> int:
    from densevse.pipeline.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="pipeline.yaml")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--models", nargs="+", default=["hmlstm", "vse", "dvsa"])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per model")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    base = Path(cfg.run.output_dir)
    (base / "compare").mkdir(parents=True, exist_ok=True)
    parent = None
    if cfg.mlflow.tracking_uri:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        exp = mlflow.set_experiment(cfg.mlflow.experiment)
        parent = MlflowClient(cfg.mlflow.tracking_uri).create_run(
            exp.experiment_id, run_name=f"{cfg.run.name}-compare", tags={"kind": "comparison"}).info.run_id
    rows = []
    for seed in range(args.seeds):  # seed-major: every model gets its first seed before any gets a second
        for model in args.models:
            rows.append(run_one(args.config, args.overrides, model, seed, base, parent))
            print(f"{model} seed {seed}: " + ", ".join(f"{m} {rows[-1][m]:.1f}" for m in METRICS), flush=True)
    summary = summarize(rows)
    md = (f"split {rows[0]['split']}: {rows[0]['n_images']} images, {rows[0]['n_captions']} captions "
          f"(chance R@1 {rows[0]['chance_r1']:.2f} %)\n\n{table(summary)}\n\n{verdict(summary)}\n")
    print("\n" + md)
    (base / "compare" / "compare_models.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=1))
    (base / "compare" / "compare_models.md").write_text(md)
    if parent:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.mlflow.tracking_uri)
        client.log_text(parent, md, "compare_models.md")
        client.log_dict(parent, {"runs": rows, "summary": summary}, "compare_models.json")
        for model, s in summary.items():
            for m in METRICS:
                client.log_metric(parent, f"{model}_{m}_mean", s[m][0])
                client.log_metric(parent, f"{model}_{m}_std", s[m][1])
        client.set_terminated(parent, "FINISHED")
    print(f"wrote {base / 'compare' / 'compare_models.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
