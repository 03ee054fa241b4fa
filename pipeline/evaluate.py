"""Retrieval and grounding evaluation.

Retrieval follows the VSE++ protocol with 5 captions per image: an image's image-to-text rank is the best rank
among its captions; a caption's text-to-image rank is the rank of its image. Reported: R@1/5/10, median and
mean rank, both directions, and rsum (sum of the six recalls, used to pick the best epoch).
Phrase grounding: a phrase's best-scoring candidate region is correct if its IoU with the phrase's gold box
is >= 0.5 (only where the dataset has gold phrase->box links).

The metric functions are pure numpy; `evaluate(cfg)` loads a checkpoint and runs them on a split of shards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------- pure metrics


def ranks(scores: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks: (image->text best rank per image that has captions, text->image rank per caption).
    scores (N_img, N_cap); caption_image (N_cap,) index of each caption's image. Ties go to the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    caption_image = np.asarray(caption_image)
    n_img = scores.shape[0]
    order = np.argsort(-scores, axis=1, kind="stable")             # captions by score, per image
    hit = caption_image[order] == np.arange(n_img)[:, None]
    has = hit.any(1)
    i2t = hit.argmax(1)[has] + 1
    order_t = np.argsort(-scores.T, axis=1, kind="stable")          # images by score, per caption
    t2i = (order_t == caption_image[:, None]).argmax(1) + 1
    return i2t, t2i


def recall_at_k(scores: np.ndarray, caption_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    i2t, t2i = ranks(scores, caption_image)
    out: dict = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(r <= k))
        out[f"{name}_medr"] = float(np.floor(np.median(r)))
        out[f"{name}_meanr"] = float(np.mean(r))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired xyxy boxes a (N,4), b (N,4)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
    h = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]).clip(min=0) * (x[:, 3] - x[:, 1]).clip(min=0)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def grounding_accuracy(pred_boxes, gold_boxes, thr: float = 0.5) -> float:
    if len(pred_boxes) == 0:
        return float("nan")
    return 100.0 * float(np.mean(box_iou(pred_boxes, gold_boxes) >= thr))


# ---------------------------------------------------------------- model loading and evaluation


def load_model(path: str | Path, device="cpu"):
    """(model, vocab, labels, checkpoint dict) from a model.pt written by training (or its directory)."""
    from models import rebuild
    from models.vocab import Vocab

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    ck = torch.load(path, map_location=device, weights_only=False)
    model = rebuild(ck["model_name"], ck["hparams"]).to(device)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, Vocab(ck["vocab"]), Vocab(ck["labels"]), ck


@torch.no_grad()
def evaluate_model(model, vocab, labels, paths, ks=(1, 5, 10), captions_per_image: int = 5,
                   batch_images: int = 100, device="cpu") -> dict:
    """Retrieval metrics and phrase grounding of `model` on the samples of `paths` (tar files)."""
    from pipeline.loader import collate, eval_items

    model.eval()
    imgs, txts, cap_img, n_img = [], [], [], 0
    pred, gold, chance = [], [], []
    for items in eval_items(paths, captions_per_image, batch_images):
        b = collate(items, vocab, labels).to(device)
        img, txt = model(b)
        imgs.append(img)
        txts.append(txt)
        cap_img.append(b.caption_image.cpu().numpy() + n_img)
        n_img += len(items)
        if b.gold:
            ps = model.phrase_scores(img, txt)  # (P, B, R)
            p = torch.tensor([g[0] for g in b.gold], device=ps.device)
            own = b.caption_image[b.phrase_caption[p]]
            best = ps[p, own].argmax(-1)
            pred.append(b.boxes[own, best].cpu().numpy())
            gboxes = np.array([g[1] for g in b.gold], np.float64)
            gold.append(gboxes)
            for j in range(len(p)):  # a uniformly random candidate region's hit rate
                cand = b.boxes[own[j]][b.cand[own[j]]].cpu().numpy()
                chance.append(np.mean(box_iou(cand, np.repeat(gboxes[j:j + 1], len(cand), 0)) >= 0.5))
    if n_img == 0:
        raise ValueError("no samples to evaluate")
    cap_img = np.concatenate(cap_img)
    scores = np.zeros((n_img, len(cap_img)), np.float32)
    i0 = 0
    for img in imgs:
        t0 = 0
        for txt in txts:
            s = model.scores(img, txt).float().cpu().numpy()
            scores[i0:i0 + s.shape[0], t0:t0 + s.shape[1]] = s
            t0 += s.shape[1]
        i0 += img["image"].shape[0]
    out = recall_at_k(scores, cap_img, ks)
    out.update(n_images=n_img, n_captions=len(cap_img), chance_r1=100.0 / n_img)
    if pred:
        out.update(grounding_acc=grounding_accuracy(np.concatenate(pred), np.concatenate(gold)),
                   grounding_chance=100.0 * float(np.mean(chance)), n_grounding=int(sum(len(g) for g in gold)))
    return out


def default_checkpoint(cfg) -> Path:
    """Where training leaves the best model of cfg.train.model."""
    return Path(cfg.run.output_dir) / "models" / cfg.train.model / "best.pt"


def evaluate(cfg, checkpoint: str | Path | None = None, split: str | None = None) -> dict:
    """Evaluate a trained checkpoint (default: the best of cfg.train.model) on cfg.eval.split of the shards."""
    from pipeline.loader import shard_paths

    split = split or cfg.eval.split
    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    model, vocab, labels, ck = load_model(checkpoint or default_checkpoint(cfg), device)
    paths = shard_paths(cfg.shard_dir, split)
    if not paths:
        raise FileNotFoundError(f"no finished {split} shards in {cfg.shard_dir}")
    out = evaluate_model(model, vocab, labels, paths, cfg.eval.ks, cfg.eval.captions_per_image, device=device)
    out.update(split=split, model=ck["model_name"], epoch=ck.get("epoch"))
    from stages.regions import shard_recall  # proposal_recall_at_0.5 (top 19) where the shards hold gold boxes

    out.update(shard_recall(paths))
    return out
