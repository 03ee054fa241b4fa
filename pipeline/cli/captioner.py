"""`densevse describe | captioner train | captioner evaluate`: the m-RNN description model."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from densevse.pipeline.cli.args import common_args, is_config, load, overrides


def cmd_describe(args) -> int:
    """Describe images: whole-image caption, region phrases, dense description (JSON on stdout)."""
    from densevse.pipeline.errors import ModelMismatch
    from densevse.pipeline.serving.describe import Describer, draw, region_proposer
    from densevse.pipeline.trained import CAPTIONER, best_path, load_trained
    from densevse.stages.base import Reject

    if args.images and is_config(args.images[0]):  # `densevse describe CONFIG IMAGE...`
        args.config, args.images = args.images[0], args.images[1:]
    if not args.images:
        print("densevse describe: no image given", file=sys.stderr)
        return 2
    cfg = load(args)
    try:
        cap = load_trained(args.model or best_path(cfg.run.output_dir, CAPTIONER), CAPTIONER)
    except (FileNotFoundError, pickle.UnpicklingError, ModelMismatch) as e:  # missing, unsafe, not a captioner
        print(f"densevse describe: {e}", file=sys.stderr)
        return 2
    propose, note = region_proposer(cfg)
    if note:
        print(f"densevse describe: {note}", file=sys.stderr)
    d = Describer(cfg, cap, propose, note)
    results, failed = [], 0
    for i, path in enumerate(args.images):
        try:
            r = d.describe(path)
        except (Reject, ValueError) as e:
            print(f"densevse describe: cannot describe {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.draw:
            out = Path(args.draw)
            if len(args.images) > 1:
                out = out.with_name(f"{out.stem}-{Path(path).stem}{out.suffix or '.png'}")
            r["drawing"] = str(draw(r, out))
        results.append(r)
    print(json.dumps(results, indent=1))
    return 2 if failed else 0


def cmd_train(args) -> int:
    """Train the m-RNN captioner on the run's train shards (Ray Train; MLflow when configured)."""
    from densevse.pipeline.training.tasks import train
    from densevse.pipeline.trained import CAPTIONER

    print(json.dumps(train(load(args), CAPTIONER, resume=args.resume), indent=1, default=str))
    return 0


def cmd_evaluate(args) -> int:
    """BLEU/METEOR/ROUGE-L/CIDEr of generated captions vs the nearest-neighbour caption baseline."""
    from densevse.pipeline.evaluation.captions import evaluate_captioner

    out = evaluate_captioner(load(args), checkpoint=args.checkpoint, split=args.split)
    print(json.dumps(out, indent=1))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("describe", help="caption images, describe their regions (JSON)",
                              description=cmd_describe.__doc__)
    p.add_argument("images", nargs="+", metavar="[CONFIG] IMAGE",
                   help="images to describe, after an optional pipeline.yaml (default: ./pipeline.yaml)")
    p.add_argument("--model", default=None, help="captioner checkpoint (default: <output_dir>/models/captioner/best.pt)")
    p.add_argument("--draw", default=None, metavar="OUT.png",
                   help="also draw boxes + phrases (several images: OUT-<image stem>.png)")
    overrides(p)
    p.set_defaults(func=cmd_describe, config="pipeline.yaml")
    c = subparsers.add_parser("captioner", help="the m-RNN description model")
    sub = c.add_subparsers(dest="captioner_command", required=True)
    t = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    common_args(t)
    t.add_argument("--resume", action="store_true", help="resume from the latest captioner checkpoint")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help=cmd_evaluate.__doc__, description=cmd_evaluate.__doc__)
    common_args(e)
    e.add_argument("--checkpoint", default=None, help="default: <output_dir>/models/captioner/best.pt")
    e.add_argument("--split", default=None, help="default: eval.split")
    e.set_defaults(func=cmd_evaluate)
