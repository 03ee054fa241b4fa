"""Region proposal quality: recall of a detector's proposals (or of the regions stored in shards) against gold
boxes, for `densevse evaluate` and the detector's held-out check; and the sliding-window grid baseline the
detectors are compared with (`compare_proposals`)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from densevse.models.metrics import proposal_recall, recall_table
from densevse.stages.regions import predict_boxes


def shard_recall(shard_paths: Sequence[str | Path], iou: float = 0.5, top_k: int = 19) -> dict:
    """Proposal recall of the regions stored in shards against the gold boxes in each sample's json (both in
    the shard image's pixels), for `densevse evaluate`. Flat floats, so MLflow logs them as metrics; {} when
    the shards carry no gold boxes (e.g. Flickr8k)."""
    import tarfile

    gold, pred = [], []
    for path in shard_paths:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext in ("json", "boxes.npy"):
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            boxes = json.loads(parts["json"]).get("gold", {}).get("boxes") if "json" in parts else None
            if boxes and "boxes.npy" in parts:
                gold.append(np.asarray(boxes, np.float32).reshape(-1, 4))
                pred.append(np.load(io.BytesIO(parts["boxes.npy"]), allow_pickle=False)[1:])  # row 0: whole image
    if not gold:
        return {}
    tag = f"{iou:g}"
    return {f"proposal_recall_at_{tag}": proposal_recall(gold, pred, iou=iou, top_k=top_k),
            "proposal_recall_images": float(len(gold)), "proposal_recall_gold_boxes": float(sum(map(len, gold)))}


GRID_SCALES = (0.5, 0.25, 0.125)  # box side / sqrt(image area), coarse to fine
GRID_RATIOS = (1.0, 0.5, 2.0)     # box height / width


def grid_boxes(w: float, h: float, scales=GRID_SCALES, ratios=GRID_RATIOS, step: float = 0.5) -> np.ndarray:
    """The uninformed baseline: a dense sliding window of boxes at each scale x aspect ratio, moved by `step` of
    its own size and spanning the image edge to edge (xyxy, float32). Order, for top-K: coarse scales first;
    within a scale, centre-out (by the box centre's distance to the image centre, ties in ratio order), so the
    top K are the largest boxes nearest the centre, where photographers put things."""
    out = []
    side0 = float(np.sqrt(w * h))
    for s in scales:
        rows = []
        for ri, r in enumerate(ratios):
            bw, bh = min(w, s * side0 / np.sqrt(r)), min(h, s * side0 * np.sqrt(r))
            xs = np.linspace(0, w - bw, int(np.ceil((w - bw) / (step * bw))) + 1)
            ys = np.linspace(0, h - bh, int(np.ceil((h - bh) / (step * bh))) + 1)
            x, y = (a.ravel() for a in np.meshgrid(xs, ys))
            dist = np.hypot(x + bw / 2 - w / 2, y + bh / 2 - h / 2)
            rows.append(np.stack([dist.round(6), np.full_like(x, ri), x, y, x + bw, y + bh], 1))
        rows = np.concatenate(rows)
        out.append(rows[np.lexsort((rows[:, 1], rows[:, 0]))][:, 2:])
    return np.concatenate(out).astype(np.float32)


def compare_proposals(images: Sequence[bytes], gold: Sequence, detectors: dict[str, str | Path], ks=(19, 100),
                      **params) -> dict[str, dict]:
    """recall_table of the grid baseline and of each detector dir on the same images (encoded bytes) and gold
    (per image (G,4) xyxy in the stored pixels). Detector boxes come from the regions stage (predict_boxes, as
    the pipeline makes them), ranked by score with no score threshold, so every method offers max(ks) boxes
    where it can; `params` go to the stage (threads, device). Adds each method's seconds per image."""
    import time

    from PIL import Image

    sizes = []
    for im in images:
        with Image.open(io.BytesIO(im)) as pil:
            sizes.append(pil.size)
    out = {}
    t = time.perf_counter()
    preds = [grid_boxes(w, h) for w, h in sizes]
    out["grid"] = {**recall_table(gold, preds, ks), "s_per_image": (time.perf_counter() - t) / max(len(images), 1)}
    for name, path in detectors.items():
        t = time.perf_counter()
        preds = predict_boxes(path, images, top_k=max(ks), **{"score_thresh": 0.0, **params})
        out[name] = {**recall_table(gold, preds, ks), "s_per_image": (time.perf_counter() - t) / max(len(images), 1)}
    return {name: {k: round(v, 4) for k, v in r.items()} for name, r in out.items()}


TABLE_COLUMNS = ("recall@0.5_top19", "recall@0.7_top19", "recall@0.5_top100", "recall@0.7_top100", "AR@100")


def format_table(rows: dict[str, dict], base: str = "grid") -> str:
    """compare_proposals' results as a text table, each method's recall@0.5_top19 also as a ratio to `base`."""
    cells = lambda name, vals, last: f"{name:<28}" + "".join(f"{v:>16}" for v in vals) + f"{last:>14}"  # noqa: E731
    lines = [cells("method", [c.replace("recall@", "R@") for c in TABLE_COLUMNS], f"R@19 / {base}")]
    ref = rows.get(base, {}).get("recall@0.5_top19")
    for name, r in rows.items():
        ratio = f"{r['recall@0.5_top19'] / ref:.2f}x" if ref else "-"
        lines.append(cells(name, [f"{r.get(c, float('nan')):.4f}" for c in TABLE_COLUMNS], ratio))
    return "\n".join(lines)
