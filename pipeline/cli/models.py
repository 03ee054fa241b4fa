"""`densevse models download | parser train | regions train`: the stage models (pipeline/stage_models/)."""
from __future__ import annotations

import sys
from pathlib import Path

from models import detector as det
from models.parser import DEFAULT_DIR
from pipeline.cli.args import common_args, load
from pipeline.stage_models import detector as detector_train
from pipeline.stage_models import parser as parser_train
from pipeline.stage_models.parser import PROCESSORS, TrainSpec


def cmd_parser_train(args) -> int:
    overrides = {k: getattr(args, k) for k in ("n_trees", "seed", "parser_epochs", "tagger_steps")
                 if getattr(args, k) is not None}
    spec = TrainSpec(**overrides)
    m = parser_train.train(args.out, spec, force=args.force, quiet=not args.verbose)
    status = "cached (inputs unchanged)" if m["cached"] else f"trained in {m['train_seconds']['total_s']}s"
    print(f"parser models in {args.out}: {status}")
    print(f"held-out synthetic bracket F1 = {m['bracket_f1']:.4f}  "
          f"(POS acc {m['eval']['test']['pos_accuracy']:.4f}, exact trees {m['eval']['test']['exact_match']:.4f}, "
          f"{m['eval']['test']['n_trees']} trees)")
    print(f"use it: stages.parse = {{impl: stanza, params: {{model_dir: {args.out}}}}}")
    return 0


def cmd_models_download(args) -> int:
    """stanza.download of the real English models, for users online; offline it fails with a clear message."""
    import stanza
    from stanza.resources.common import DEFAULT_MODEL_DIR, DEFAULT_RESOURCES_URL

    target = args.dir
    if target is None:
        sc = load(args).stages.parse
        configured = sc.params.model_dir if sc.impl == "stanza" else None
        own = configured is None or Path(configured).resolve() == DEFAULT_DIR.resolve()
        target = Path(DEFAULT_MODEL_DIR) if own else Path(configured).expanduser()
    try:
        stanza.download(args.lang, model_dir=str(target), processors=PROCESSORS, logging_level="WARN")
    except Exception as e:  # noqa: BLE001 - offline / proxy / disk: one clear line, no traceback
        print(f"densevse: could not download Stanza {args.lang!r} models ({PROCESSORS}) from {DEFAULT_RESOURCES_URL} "
              f"into {target}: {type(e).__name__}: {str(e)[:300]}\n"
              f"Offline? `densevse parser train` makes small models here instead (the default).", file=sys.stderr)
        return 1
    print(f"Stanza {args.lang!r} models in {target}; use them: -s stages.parse.params.model_dir={target}")
    return 0


def register_parser(subparsers) -> None:
    m = subparsers.add_parser("models", help="download Stanza's real models (online)")
    msub = m.add_subparsers(dest="models_command", required=True)
    d = msub.add_parser("download", help=f"stanza.download({PROCESSORS}) into the configured stages.parse "
                                         "model_dir (Stanza's default dir when that is the project's own)")
    common_args(d)
    d.add_argument("--dir", type=Path, default=None, help="download here instead")
    d.add_argument("--lang", default="en")
    d.set_defaults(func=cmd_models_download)

    p = subparsers.add_parser("parser", help="Stanza parser models")
    sub = p.add_subparsers(dest="parser_command", required=True)
    t = sub.add_parser("train", help="train a small Stanza POS tagger + constituency parser on synthetic captions "
                                     "(offline; skipped when the model dir already holds models for the same inputs)")
    t.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"model dir (default {DEFAULT_DIR})")
    t.add_argument("--n-trees", dest="n_trees", type=int, default=None, help=f"synthetic trees generated (default {TrainSpec().n_trees})")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--parser-epochs", dest="parser_epochs", type=int, default=None)
    t.add_argument("--tagger-steps", dest="tagger_steps", type=int, default=None)
    t.add_argument("--force", action="store_true", help="retrain even when cached")
    t.add_argument("--verbose", "-v", action="store_true", help="show Stanza's training logs")
    t.set_defaults(func=cmd_parser_train)


def cmd_regions_train(args) -> int:
    fields = ("iters", "num_images", "seed", "eval_images", "threads", "ims_per_batch")
    spec = detector_train.DetectorSpec(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    r = detector_train.train(args.out, spec, force=args.force, quiet=not args.verbose)
    status = "cached (same spec)" if r["cached"] else f"trained in {r['train_s']}s ({r['threads']} threads)"
    print(f"detector in {args.out}: {status}")
    if "recall@0.5_top19" in r:
        print(f"held-out synthetic proposal recall (IoU 0.5, top 19) = {r['recall@0.5_top19']:.4f}  "
              f"(IoU 0.7: {r['recall@0.7_top19']:.4f}, {r['eval_images']} images)")
    print(f"use it: stages.regions = {{impl: detectron2, params: {{config: {args.out}}}}}")
    return 0


def register_regions(subparsers) -> None:
    p = subparsers.add_parser("regions", help="Detectron2 region detector")
    sub = p.add_subparsers(dest="regions_command", required=True)
    t = sub.add_parser("train", help="train the Faster R-CNN (EfficientNet-Lite0 FPN) on synthetic gold boxes with "
                                     "Detectron2's DefaultTrainer (skipped when the dir holds a model of the same spec)")
    t.add_argument("--out", type=Path, default=det.default_detector_dir(),
                   help=f"model dir (default {det.default_detector_dir()})")
    t.add_argument("--iters", type=int, default=None, help="solver iterations (default 150)")
    t.add_argument("--ims-per-batch", dest="ims_per_batch", type=int, default=None, help="default 4")
    t.add_argument("--num-images", dest="num_images", type=int, default=None, help="synthetic scenes (default 1500)")
    t.add_argument("--eval-images", dest="eval_images", type=int, default=None, help="held-out scenes (default 200)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    t.add_argument("--force", action="store_true", help="retrain even when cached")
    t.add_argument("--verbose", "-v", action="store_true", help="show Detectron2's training log")
    t.set_defaults(func=cmd_regions_train)


def register(subparsers) -> None:
    register_parser(subparsers)
    register_regions(subparsers)
