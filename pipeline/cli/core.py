"""The core verbs: run, preprocess, train, evaluate, inspect, config."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.cli.args import common_args, load


def _print_summary(title: str, summary: dict) -> None:
    print(f"\n== {title} ==")
    print(json.dumps(summary, indent=2, default=str))


def cmd_preprocess(args) -> int:
    from pipeline.preprocess.run import preprocess

    _print_summary("preprocess", preprocess(load(args), progress=not args.quiet, force=args.force))
    return 0


def cmd_train(args) -> int:
    from pipeline.training.embedding import train

    _print_summary("train", train(load(args), resume=args.resume))
    return 0


def cmd_evaluate(args) -> int:
    from pipeline.evaluation.retrieval import evaluate

    _print_summary("evaluate", evaluate(load(args), checkpoint=args.checkpoint))
    return 0


def cmd_run(args) -> int:
    """Everything, in order, on one config: preprocess -> train -> evaluate."""
    from pipeline.evaluation.retrieval import evaluate
    from pipeline.preprocess.run import preprocess
    from pipeline.training.embedding import train

    cfg = load(args)
    summary = {"preprocess": preprocess(cfg, progress=not args.quiet, force=args.force)}
    # Short: the per-epoch history is in <output_dir>/train-<model>.json (and MLflow).
    summary["train"] = {k: v for k, v in train(cfg).items() if k != "history"}
    summary["evaluate"] = evaluate(cfg)
    _print_summary("run", summary)
    return 0


def cmd_inspect(args) -> int:
    import pyarrow.parquet as pq

    from pipeline.preprocess import shards

    shard_dir = Path(args.shards) if args.shards else load(args).shard_dir
    if not shard_dir.is_dir():
        print(f"densevse: no shard directory {shard_dir}", file=sys.stderr)
        return 2
    summary = shards.summarize_shards(shard_dir)
    if args.rejects:
        t = pq.read_table(shard_dir / shards.MANIFEST).to_pylist()
        summary["rejected"] = [{"key": r["key"], "reason": r["reason"]} for r in t if r["status"] == "rejected"]
    _print_summary(f"inspect {shard_dir}", summary)
    return 0


def cmd_config(args) -> int:
    from pipeline.config import dump_config

    print(dump_config(load(args)), end="")
    return 0


COMMANDS = {"run": cmd_run, "preprocess": cmd_preprocess, "train": cmd_train, "evaluate": cmd_evaluate}


def register(sub) -> None:
    for name, fn, help_ in [
        ("run", cmd_run, "preprocess, train and evaluate"),
        ("preprocess", cmd_preprocess, "dataset -> WebDataset shards on Ray"),
        ("train", cmd_train, "train on the shards with Ray Train"),
        ("evaluate", cmd_evaluate, "retrieval R@K and phrase grounding on a split"),
        ("inspect", cmd_inspect, "summarise a shard set: counts, stats, rejects"),
        ("config", cmd_config, "print the validated config with overrides applied"),
    ]:
        p = sub.add_parser(name, help=help_, description=fn.__doc__ or help_)
        common_args(p)
        p.set_defaults(func=fn)
        if name in ("run", "preprocess"):
            p.add_argument("--quiet", action="store_true", help="no progress bars")
            p.add_argument("--force", action="store_true",
                           help="redo finished shards made with another config (else such a resume is refused)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
        if name == "evaluate":
            p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the run's best)")
        if name == "inspect":
            p.add_argument("--shards", default=None, help="shard dir (default: from the config)")
            p.add_argument("--rejects", action="store_true", help="list every rejected sample and its reason")
