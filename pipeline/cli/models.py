"""`densevse models download | parser train | regions train`: the stage models (pipeline/stage_models/)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from densevse.models import detector as det
from densevse.models.parser import DEFAULT_DIR
from densevse.pipeline.cli.args import common_args, load
from densevse.pipeline.stage_models import detector as detector_train
from densevse.pipeline.stage_models import parser as parser_train
from densevse.pipeline.stage_models.parser import PROCESSORS, TrainSpec


def cmd_parser_train(args) -> int:
    overrides = {k: getattr(args, k) for k in ("n_trees", "seed", "parser_epochs", "tagger_steps", "bert_model")
                 if getattr(args, k) is not None}
    if args.bert_finetune:
        overrides["bert_finetune"] = True
    spec = TrainSpec.for_treebank(str(args.treebank), **overrides) if args.treebank else TrainSpec(**overrides)
    out = args.out or (parser_train.treebank_dir(args.treebank) if args.treebank else DEFAULT_DIR)
    t0 = time.perf_counter()
    m = parser_train.train(out, spec, force=args.force, quiet=not args.verbose, device=args.device)
    took = time.perf_counter() - t0
    status = (f"cached (inputs unchanged; trained in {m['train_seconds']['total_s']}s)" if m["cached"] else
              f"trained in {m['train_seconds']['total_s']}s + {m['eval_seconds']}s evaluation")
    print(f"parser models in {out}: {status}; this command took {took:.0f}s")
    tb = m["treebank"]  # the treebank report (older manifests: trees per split only)
    if tb.get("rejected"):
        print("trees skipped: " + ", ".join(f"{n} {why}" for why, n in tb["rejected"].items()))
    test = m["eval"]["test"]
    print(f"{tb.get('source', 'synthetic')} test: bracket F1 "
          f"{test['bracket_f1']:.4f} (evalb, punctuation excluded), POS acc {test['pos_accuracy']:.4f}, "
          f"exact trees {test['exact_match']:.4f}, {test['n_trees']} trees")
    print(f"use it: stages.parse = {{impl: stanza, params: {{model_dir: {out}}}}}")
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
    t = sub.add_parser("train", help="train a Stanza POS tagger + constituency parser on a real treebank or the "
                                     "synthetic captions (offline; skipped when the model dir already holds models "
                                     "for the same inputs)")
    t.add_argument("--treebank", type=Path, default=None,
                   help="a PTB-bracket treebank dir (e.g. ../shared/data/gum: *.ptb + splits.md); default: the "
                        "synthetic caption grammar")
    t.add_argument("--out", type=Path, default=None,
                   help=f"model dir (default {DEFAULT_DIR}; with --treebank .cache/parser/stanza-<its dir name>)")
    t.add_argument("--n-trees", dest="n_trees", type=int, default=None,
                   help=f"synthetic trees generated (default {TrainSpec().n_trees})")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--parser-epochs", dest="parser_epochs", type=int, default=None)
    t.add_argument("--tagger-steps", dest="tagger_steps", type=int, default=None)
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="train on the CPU (default) or a GPU")
    t.add_argument("--bert-model", dest="bert_model", default=None,
                   help="a pretrained transformer the parser reads (a local Hugging Face model dir)")
    t.add_argument("--bert-finetune", dest="bert_finetune", action="store_true", help="finetune that transformer")
    t.add_argument("--force", action="store_true", help="retrain even when cached")
    t.add_argument("--verbose", "-v", action="store_true", help="show Stanza's training logs")
    t.set_defaults(func=cmd_parser_train)


def cmd_regions_train(args) -> int:
    from pydantic import ValidationError

    from densevse.pipeline.errors import DatasetError
    from densevse.pipeline.evaluation.proposals import format_table

    fields = ("dataset", "roots", "holdout", "backbone", "input_size", "freeze_stages", "base_lr", "iters",
              "num_images", "seed", "eval_images", "threads", "ims_per_batch", "device", "workers", "fpn_channels",
              "box_head_dim")
    try:
        spec = detector_train.DetectorSpec(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    except ValidationError as e:
        print(f"densevse: regions train: {'; '.join(err['msg'] for err in e.errors())}", file=sys.stderr)
        return 2
    out = args.out or detector_train.default_out(spec)
    synthetic = det.default_detector_dir()  # today's detector: a baseline for the real-photo one, when trained
    baselines = {"synthetic detector": synthetic} if spec.dataset == "coco" and \
        detector_train.is_trained(synthetic, detector_train.DetectorSpec()) else {}
    try:
        r = detector_train.train(out, spec, force=args.force, quiet=not args.verbose, baselines=baselines)
    except DatasetError as e:
        print(f"densevse: regions train: {e}", file=sys.stderr)
        return 2
    status = "cached (same spec)" if r["cached"] else \
        f"trained in {r['train_s']}s on {r.get('device', 'cpu')} ({r['threads']} threads)"
    print(f"detector in {out}: {status}")
    if "data" in r:
        d = r["data"]
        print(f"training: {d['train_images']} photos, {d['train_boxes']} boxes; held out ({spec.holdout}): "
              f"{d['holdout_images']} photos, {d['holdout_boxes']} boxes")
        for reason, n in d["report"].items():
            print(f"  {n:6d}  {reason}")
    if spec.dataset == "coco" and "recall@0.5_top19" in r:
        print(f"held-out real photos, class-agnostic proposal recall ({r['eval_images']} photos; top K by score):")
        print(format_table({f"coco {spec.backbone}": r, **r["baselines"]}))
        if not baselines:
            print(f"(synthetic detector baseline: {synthetic} not trained; `densevse regions train` makes it)")
    elif "recall@0.5_top19" in r:
        print(f"held-out synthetic proposal recall (IoU 0.5, top 19) = {r['recall@0.5_top19']:.4f}  "
              f"(IoU 0.7: {r['recall@0.7_top19']:.4f}, {r['eval_images']} images)")
    print(f"use it: stages.regions = {{impl: detectron2, params: {{config: {out}}}}}")
    return 0


def register_regions(subparsers) -> None:
    p = subparsers.add_parser("regions", help="Detectron2 region detector")
    sub = p.add_subparsers(dest="regions_command", required=True)
    t = sub.add_parser("train", help="train the Faster R-CNN (EfficientNet-Lite FPN) on synthetic or real COCO boxes "
                                     "with Detectron2's DefaultTrainer (skipped when the dir holds a model of the "
                                     "same spec)")
    t.add_argument("--out", type=Path, default=None,
                   help=f"model dir (default {det.default_detector_dir()}; coco: .cache/detector-coco[-lite2])")
    t.add_argument("--dataset", choices=("synthetic", "coco"), default=None, help="training boxes (default synthetic)")
    t.add_argument("--root", dest="roots", action="append", default=None,
                   help="coco: a COCO root (annotations/instances_*.json + images/<split>/); repeat to merge "
                        "(default ../shared/data/coco-det and coco-mini)")
    t.add_argument("--holdout", default=None,
                   help="coco: held-out '<root dir name>/<split>' (default coco-det/val2017)")
    t.add_argument("--backbone", choices=("efficientnet-lite0", "efficientnet-lite2"), default=None)
    t.add_argument("--input-size", dest="input_size", type=int, default=None,
                   help="short side (px) at test and centre of the training jitter (default: 224 synthetic, 512 coco)")
    t.add_argument("--freeze-stages", dest="freeze_stages", type=int, default=None,
                   help="EfficientNet stages kept at ImageNet weights (0-5)")
    t.add_argument("--base-lr", dest="base_lr", type=float, default=None)
    t.add_argument("--iters", type=int, default=None, help="solver iterations (default 150)")
    t.add_argument("--ims-per-batch", dest="ims_per_batch", type=int, default=None, help="default 4")
    t.add_argument("--num-images", dest="num_images", type=int, default=None,
                   help="synthetic scenes (default 1500); coco: at most this many training photos (default all)")
    t.add_argument("--eval-images", dest="eval_images", type=int, default=None,
                   help="held-out scenes / at most this many held-out photos (default 200)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    t.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="train on the CPU (default) or a GPU; coco picks the recipe of the device (README: Regions)")
    t.add_argument("--workers", type=int, default=None,
                   help="data-loader processes (default: one per spare core up to 8 on cuda, none on cpu)")
    t.add_argument("--fpn-channels", dest="fpn_channels", type=int, default=None)
    t.add_argument("--box-head-dim", dest="box_head_dim", type=int, default=None)
    t.add_argument("--force", action="store_true", help="retrain even when cached")
    t.add_argument("--verbose", "-v", action="store_true", help="show Detectron2's training log")
    t.set_defaults(func=cmd_regions_train)


def register(subparsers) -> None:
    register_parser(subparsers)
    register_regions(subparsers)
