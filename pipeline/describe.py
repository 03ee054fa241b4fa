"""`densevse describe IMAGE...`: a whole-image caption, one phrase per proposed region, and the dense
description; plus the `densevse captioner train|evaluate` commands.

    densevse describe img.jpg [--model runs/x/models/captioner/best.pt] [--draw out.png] [-s captioner.beam_size=3]

Per image: the image is read and normalised as in preprocessing (stages/images.py; unreadable -> exit 2 naming
the file), regions are proposed by the configured regions stage (Detectron2 with existing weights; any other
stage, e.g. gold_boxes, cannot propose boxes for a new image, so only the whole image is described and the
output says so), EfficientNet-Lite0 features are computed by the configured features stage, then the captioner
(pipeline/captioner.py) writes:
  caption  beam search (captioner.beam_size, default 7 as in DVSA) on the whole image (row 0);
  regions  the top captioner.top_k_regions proposals in detector order, minus any box overlapping a kept one
           by IoU > 0.7, each with its phrase and the phrase's confidence (exp mean word log-prob);
  dense    HM-LSTM's dense description: the regions' phrases, duplicates dropped (the higher-ranked region keeps
           its phrase), ordered left to right by box centre, joined as "a red circle, a blue square and a
           green star". No region (none above the detector threshold): the caption is still written, dense is "".
Output: a JSON array with one {image, caption, caption_score, regions: [{box, phrase, score}], dense, note}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.cli import common_args

DEDUP_IOU = 0.7


def dense_description(phrases: list[str], boxes) -> str:
    """Join region phrases into one sentence: duplicates dropped (first kept), left to right by box centre."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    seen, keep = set(), []
    for i, p in enumerate(phrases):
        if p and p not in seen:
            seen.add(p)
            keep.append(i)
    keep.sort(key=lambda i: (boxes[i, 0] + boxes[i, 2]) / 2)
    words = [phrases[i] for i in keep]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def dedup_boxes(boxes: np.ndarray, k: int, iou: float = DEDUP_IOU) -> np.ndarray:
    """The first k boxes (detector order) that do not overlap an already kept one by more than `iou`."""
    from stages.regions import box_iou

    kept: list[np.ndarray] = []
    for b in np.asarray(boxes, np.float32).reshape(-1, 4):
        if len(kept) == k:
            break
        if not kept or box_iou(b[None], np.stack(kept)).max() <= iou:
            kept.append(b)
    return np.stack(kept) if kept else np.zeros((0, 4), np.float32)


def region_proposer(cfg):
    """(propose(list of JPEG bytes) -> list of (R, 4) boxes, note). propose is None when the configured regions
    stage cannot propose boxes for a new image (not Detectron2, or its weights are missing)."""
    from stages.regions import RegionParams, resolve

    sc = cfg.stages.regions
    if sc.impl != "detectron2":
        return None, (f"stages.regions.impl={sc.impl} cannot propose regions for a new image: whole-image caption "
                      f"only (set stages.regions.impl=detectron2 with trained weights for region phrases)")
    params = RegionParams.model_validate(sc.params).model_dump()
    config, top_k = params.pop("config"), cfg.captioner.top_k_regions
    params.pop("top_k")
    try:
        resolve(config, params["weights"])
    except FileNotFoundError as e:
        return None, f"no region detector ({e}): whole-image caption only (train one: `densevse regions train`)"

    def propose(jpegs: list[bytes]) -> list[np.ndarray]:
        from stages.regions import predict_boxes

        return predict_boxes(config, jpegs, top_k=max(3 * top_k, 1), **params)

    return propose, ""


def load_image(path: str | Path, max_side: int) -> tuple[bytes, int, int]:
    """JPEG bytes, width, height of an image file, normalised as ingest does; raises Reject for bad files."""
    from stages.images import decode_rgb, read_bytes, to_jpeg

    img, _ = decode_rgb(read_bytes(str(path)), max_side=max_side)
    return to_jpeg(img), img.width, img.height


class Describer:
    """Images -> descriptions, with the configured regions and features stages and a trained captioner."""

    def __init__(self, cfg, captioner, propose=None, note: str = ""):
        from stages import STAGES

        self.cfg, self.cap, self.propose, self.note = cfg, captioner, propose, note
        fc = cfg.stages.features
        self.features = STAGES.get(fc.impl)(fc.params)
        self.max_side = int(cfg.stages.ingest.params.get("max_side", 640))

    def featurize(self, jpeg: bytes, w: int, h: int, boxes: np.ndarray) -> np.ndarray:
        from stages.base import empty_row, npy_bytes, npy_load

        boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), boxes.reshape(-1, 4)])
        row = empty_row(key="describe", image=jpeg, width=w, height=h, boxes=npy_bytes(boxes))
        row = self.features.process([row])[0]
        if row["reject"]:
            raise ValueError(row["reject"])
        feats = npy_load(row["feats"]).astype(np.float32)
        want = self.cap.model.hparams["feat_dim"]
        if feats.shape[1] != want:
            raise ValueError(f"features stage {self.cfg.stages.features.impl} gives {feats.shape[1]}-d features, "
                             f"the captioner was trained on {want}-d ones")
        return feats

    def describe(self, path: str | Path) -> dict:
        """One image's description dict; raises stages.base.Reject for an unreadable image."""
        c = self.cfg.captioner
        jpeg, w, h = load_image(path, self.max_side)
        boxes = np.zeros((0, 4), np.float32)
        if self.propose is not None and c.top_k_regions > 0:
            boxes = dedup_boxes(self.propose([jpeg])[0], c.top_k_regions)
        feats = self.featurize(jpeg, w, h, boxes)
        text, score = self.cap.caption([feats], c.beam_size, c.max_len, c.no_repeat_ngram)[0]
        phrases = self.cap.describe(feats[1:], self.cap.phrase_kind, c.beam_size, c.max_len,
                                    no_repeat_ngram=c.no_repeat_ngram) if len(boxes) else []
        note = self.note or ("" if len(boxes) else "no region above the detector threshold: whole-image caption only")
        return {"image": str(path), "width": w, "height": h, "caption": text, "caption_score": round(score, 4),
                "regions": [{"box": [round(float(v), 1) for v in b], "phrase": p, "score": round(s, 4)}
                            for b, (p, s) in zip(boxes, phrases)],
                "dense": dense_description([p for p, _ in phrases], boxes), "note": note}


def draw(result: dict, out: str | Path) -> Path:
    """The image with its region boxes and phrases, the caption (and dense description) above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.images import decode_rgb, read_bytes

    img, _ = decode_rgb(read_bytes(result["image"]), max_side=max(result["width"], result["height"]))
    fig, ax = plt.subplots(figsize=(7, 7.6))
    ax.imshow(img)
    colors = plt.cm.tab10.colors
    for i, r in enumerate(result["regions"]):
        x0, y0, x1, y1 = r["box"]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colors[i % 10], lw=2))
        ax.text(x0, y0, r["phrase"], color="white", fontsize=8, va="bottom",
                bbox={"facecolor": colors[i % 10], "alpha": 0.8, "pad": 1})
    title = result["caption"] + (f"\n{result['dense']}" if result["dense"] else "")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


# ---------------------------------------------------------------- commands


def _load_cfg(args):
    from pipeline.config import load_config

    path = args.config if args.config is not None or not Path("pipeline.yaml").is_file() else "pipeline.yaml"
    return load_config(path, args.overrides)


def cmd_describe(args) -> int:
    """Describe images: whole-image caption, region phrases, dense description (JSON on stdout)."""
    from pipeline.captioner import Captioner, default_checkpoint
    from stages.base import Reject

    cfg = _load_cfg(args)
    try:
        cap = Captioner.load(args.model or default_checkpoint(cfg))
    except FileNotFoundError as e:
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
    from pipeline.captioner import train_captioner

    print(json.dumps(train_captioner(_load_cfg(args)), indent=1, default=str))
    return 0


def cmd_evaluate(args) -> int:
    """BLEU/METEOR/ROUGE-L/CIDEr of generated captions vs the nearest-neighbour caption baseline."""
    from pipeline.caption_eval import evaluate_captioner

    out = evaluate_captioner(_load_cfg(args), checkpoint=args.checkpoint, split=args.split)
    print(json.dumps(out, indent=1))
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="pipeline.yaml (default: ./pipeline.yaml if present)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -s captioner.beam_size=3 (repeatable)")


def register(subparsers) -> None:
    p = subparsers.add_parser("describe", help="caption images, describe their regions (JSON)",
                              description=cmd_describe.__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default=None, help="captioner checkpoint (default: <output_dir>/models/captioner/best.pt)")
    p.add_argument("--draw", default=None, metavar="OUT.png",
                   help="also draw boxes + phrases (several images: OUT-<image stem>.png)")
    _config_args(p)
    p.set_defaults(func=cmd_describe)
    c = subparsers.add_parser("captioner", help="the m-RNN description model")
    sub = c.add_subparsers(dest="captioner_command", required=True)
    t = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    common_args(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help=cmd_evaluate.__doc__, description=cmd_evaluate.__doc__)
    common_args(e)
    e.add_argument("--checkpoint", default=None, help="default: <output_dir>/models/captioner/best.pt")
    e.add_argument("--split", default=None, help="default: eval.split")
    e.set_defaults(func=cmd_evaluate)
