"""The core verbs: run, preprocess, train, evaluate, inspect, config."""
from __future__ import annotations

import json
import logging
import sys
import time

from densevse.pipeline.cli.args import common_args, load


def _print_summary(title: str, summary: dict) -> None:
    print(f"\n== {title} ==")
    print(json.dumps(summary, indent=2, default=str))


def _retry_prefix(args) -> str | None:
    """--retry-rejected's prefix; `--retry-rejected run.yaml` (the flag before the config) is the config."""
    from densevse.pipeline.cli.args import DEFAULT_CONFIG, is_config

    if args.retry_rejected and is_config(args.retry_rejected) and args.config == DEFAULT_CONFIG:
        args.config, args.retry_rejected = args.retry_rejected, ""
    return args.retry_rejected


def _console(args, cfg):
    """The verb's console (pipeline/console.py): progress, real warnings, the final table; the rest in run.log."""
    from densevse.pipeline.console import Console

    return Console(cfg.run.output_dir / "run.log",
                   "quiet" if args.quiet else "verbose" if args.verbose else "normal")


def _paths(cfg, summary: dict, summary_file: str) -> dict:
    """Where the outputs of a verb are, for the final table."""
    from densevse.pipeline.trained import best_path

    out, tr = cfg.run.output_dir, summary.get("train") or {}
    best = best_path(out, cfg.train.model)
    from densevse.pipeline.config import redact_uri

    mlflow = f"run {tr['mlflow_run_id']} at {redact_uri(cfg.mlflow.tracking_uri)}" if tr.get("mlflow_run_id") else None
    return {"shards": str(cfg.shard_dir) if "preprocess" in summary else None,
            "best model": str(best) if best.is_file() and ("train" in summary or "evaluate" in summary) else None,
            "mlflow": mlflow, "report": summary.get("report"), "summary": str(out / summary_file),
            "log": str(out / "run.log")}


def _finish(con, args, cfg, verb: str, summary: dict) -> None:
    """The summary as JSON in <output_dir>/summary.json (`run`) or <verb>-summary.json, and for the person the
    table (--json: the JSON, as `== verb ==` + JSON, which scripts parse)."""
    from densevse.pipeline import storage
    from densevse.pipeline.console import summary_table

    name = "summary.json" if verb == "run" else f"{verb}-summary.json"
    summary["paths"] = _paths(cfg, summary, name)
    storage.put_atomic(cfg.run.output_dir / name, json.dumps(summary, indent=1, default=str))
    con.print(f"\n== {verb} ==\n" + json.dumps(summary, indent=2, default=str) if args.json
              else summary_table(summary))


def _report(cfg, summary: dict) -> None:
    """report.html beside the outputs (pipeline/report.py); a failure to draw it is a warning, not a failed run."""
    from densevse.pipeline.report import write_report

    try:
        summary["report"] = str(write_report(cfg, summary))
    except Exception as e:  # noqa: BLE001 -- the metrics are already computed and saved
        logging.getLogger("densevse.report").warning("report.html not written: %s: %s", type(e).__name__, e)


def cmd_preprocess(args) -> int:
    from densevse.pipeline.preprocess.run import preprocess

    retry = _retry_prefix(args)  # first: it may name the config
    cfg = load(args)
    with _console(args, cfg) as con:
        summary = {"preprocess": preprocess(cfg, progress=args.verbose, force=args.force, retry_rejected=retry,
                                             verify=args.verify)}
        _finish(con, args, cfg, "preprocess", summary if not args.json else summary["preprocess"])
    return 0


def cmd_train(args) -> int:
    from densevse.pipeline.training.tasks import train

    cfg = load(args)
    with _console(args, cfg) as con:
        tr = train(cfg, resume=args.resume)
        _finish(con, args, cfg, "train", tr if args.json else {"train": tr})
    return 0


def cmd_evaluate(args) -> int:
    from densevse.pipeline.evaluation.retrieval import evaluate

    cfg = load(args)
    with _console(args, cfg) as con:
        summary = {"evaluate": _timed(evaluate, cfg, checkpoint=args.checkpoint)}
        if args.checkpoint:  # the report draws with the model evaluated
            summary["evaluate"]["checkpoint"] = str(args.checkpoint)
        _report(cfg, summary)
        _finish(con, args, cfg, "evaluate", summary["evaluate"] if args.json else summary)
    return 0


def _timed(fn, *a, **kw) -> dict:
    t0 = time.time()
    out = fn(*a, **kw)
    out.setdefault("seconds", round(time.time() - t0, 1))
    return out


def cmd_run(args) -> int:
    """Everything, in order, on one config: preprocess -> train -> evaluate."""
    from densevse.pipeline.evaluation.retrieval import evaluate
    from densevse.pipeline.preprocess.run import preprocess
    from densevse.pipeline.training.tasks import train

    retry = _retry_prefix(args)  # first: it may name the config
    cfg = load(args)
    with _console(args, cfg) as con:
        summary = {"preprocess": preprocess(cfg, progress=args.verbose, force=args.force, retry_rejected=retry,
                                             verify=args.verify)}
        # Short: the per-epoch history is in <output_dir>/train-<model>.json (and MLflow).
        summary["train"] = {k: v for k, v in train(cfg).items() if k != "history"}
        summary["evaluate"] = _timed(evaluate, cfg)
        _report(cfg, summary)
        _finish(con, args, cfg, "run", summary)
    return 0


def cmd_inspect(args) -> int:
    from densevse.pipeline import shardset, storage

    shard_dir = storage.location(args.shards) if args.shards else load(args).shard_dir
    if not shard_dir.is_dir():  # an object-store prefix is a dir once it holds an object
        print(f"densevse: no shard directory {shard_dir}", file=sys.stderr)
        return 2
    summary = shardset.summarize_shards(shard_dir)
    if args.rejects:
        summary["rejected"] = shardset.rejected_samples(shard_dir)
    _print_summary(f"inspect {shard_dir}", summary)
    return 0


def cmd_config(args) -> int:
    from densevse.pipeline.config import dump_config

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
        if name in COMMANDS:
            loud = p.add_mutually_exclusive_group()
            loud.add_argument("--quiet", action="store_true", help="only the final table and errors")
            loud.add_argument("--verbose", action="store_true",
                              help="everything (Ray's, Detectron2's logs) on the console too, not only in run.log")
            p.add_argument("--json", action="store_true", help="end with the summary as JSON instead of the table")
        if name in ("run", "preprocess"):
            p.add_argument("--force", action="store_true",
                           help="redo finished shards made with another config (else such a resume is refused)")
            p.add_argument("--retry-rejected", nargs="?", const="", default=None, metavar="REASON_PREFIX",
                           help="also redo the finished shards holding samples rejected with a reason starting "
                                "with REASON_PREFIX (e.g. 'ingest: download'; none: any rejection)")
            p.add_argument("--verify", action="store_true",
                           help="hash every finished tar before trusting it (default: its size and mtime / ETag "
                                "against its stats; a full hash reads the whole shard set)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
        if name == "evaluate":
            p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the run's best)")
        if name == "inspect":
            p.add_argument("--shards", default=None, help="shard dir (default: from the config)")
            p.add_argument("--rejects", action="store_true", help="list every rejected sample and its reason")
