"""Region proposal quality: recall of a detector's proposals (or of the regions stored in shards) against gold
boxes, for `densevse evaluate` and the detector's held-out check."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from models.metrics import proposal_recall
from stages.regions import predict_boxes


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


def evaluate_recall(weights_dir: str | Path, images: Sequence, gold: Sequence, iou: float = 0.5,
                    top_k: int = 19, **params) -> float:
    """Proposal recall of a trained detector dir on `images` against `gold` (per image (G,4) xyxy boxes).
    For `densevse evaluate`; `params` go to the regions stage (e.g. threads, device, score_thresh)."""
    preds = predict_boxes(weights_dir, images, top_k=top_k, **params)
    return proposal_recall(list(gold), preds, iou=iou, top_k=top_k)
