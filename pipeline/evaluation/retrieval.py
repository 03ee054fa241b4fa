"""Retrieval and phrase-grounding evaluation of an embedding model on a split of shards (`densevse evaluate`).

The metrics themselves (VSE++ retrieval protocol, grounding at IoU 0.5) are pure functions in models/metrics.py;
this module embeds a split, scores it, and adds the shards' proposal recall where they hold gold boxes. Where
samples hold boxes with category labels but no phrase links (COCO), phrases are linked to boxes by their head
noun (silver links, models/grounding.py) and scored as grounded when the best region is within IoU 0.5 of any
box of the category: `silver_grounding_acc` beside its random-region chance and the linked phrase count.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from densevse.models import grounding
from densevse.models.batch import collate
from densevse.models.metrics import grounding_accuracy, paired_iou, recall_at_k
from densevse.pipeline import storage
from densevse.pipeline.evaluation.proposals import shard_recall
from densevse.pipeline.shardset import eval_items, shard_paths
from densevse.pipeline.trained import EMBEDDING, best_path, load_trained


@torch.no_grad()
def evaluate_model(model, vocab, labels, paths, ks=(1, 5, 10), captions_per_image: int = 5,
                   batch_images: int = 100, device="cpu") -> dict:
    """Retrieval metrics and phrase grounding of `model` on the samples of `paths` (tar files)."""
    model.eval()
    imgs, txts, cap_img, n_img = [], [], [], 0
    pred, gold, chance = [], [], []
    silver, n_np = [], 0
    for items in eval_items(paths, captions_per_image, batch_images):
        linked = [grounding.silver_sample(s, caps) for s, caps in items]
        n_np += sum(n for _, n in linked)
        items = [(s, caps) for (s, _), (_, caps) in zip(linked, items)]
        b = collate(items, vocab, labels, getattr(model, "caption_tree", "parse")).to(device)
        img, txt = model(b)
        imgs.append(img)
        txts.append(txt)
        cap_img.append(b.caption_image.cpu().numpy() + n_img)
        n_img += len(items)
        if b.gold and any((s["meta"].get("gold") or {}).get("silver") for s, _ in items):
            silver += _silver_grounded(model.phrase_scores(img, txt), b)
        elif b.gold:
            ps = model.phrase_scores(img, txt)  # (P, B, R)
            p = torch.tensor([g[0] for g in b.gold], device=ps.device)
            own = b.caption_image[b.phrase_caption[p]]
            best = ps[p, own].argmax(-1)
            pred.append(b.boxes[own, best].cpu().numpy())
            gboxes = np.array([g[1] for g in b.gold], np.float64)
            gold.append(gboxes)
            for j in range(len(p)):  # a uniformly random candidate region's hit rate
                cand = b.boxes[own[j]][b.cand[own[j]]].cpu().numpy()
                chance.append(np.mean(paired_iou(cand, np.repeat(gboxes[j:j + 1], len(cand), 0)) >= 0.5))
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
    if n_np:
        out.update(grounding.summarize(silver, n_np))
    return out


def _silver_grounded(ps: torch.Tensor, b) -> list[tuple[bool, float]]:
    """(grounded, chance) per silver-linked phrase of a batch: its links are (phrase, box) pairs, one per box of
    the category, and the phrase is grounded when its best candidate region is within IoU 0.5 of any of them."""
    boxes_of: dict[int, list] = {}
    for p, box in b.gold:
        boxes_of.setdefault(p, []).append(box)
    out = []
    for p, gboxes in boxes_of.items():
        own = int(b.caption_image[b.phrase_caption[p]])
        cand = b.cand[own]
        out.append(grounding.grounded(ps[p, own][cand].float().cpu().numpy(), b.boxes[own][cand].cpu().numpy(),
                                      np.asarray(gboxes, np.float64)))
    return out


def evaluate(cfg, checkpoint: str | Path | None = None, split: str | None = None) -> dict:
    """Evaluate a trained embedding model (a checkpoint file or dir; default: the best of cfg.train.model) on
    cfg.eval.split of the shards."""
    split = split or cfg.eval.split
    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    model, vocab, labels, ck = load_trained(checkpoint or best_path(cfg.run.output_dir, cfg.train.model), EMBEDDING,
                                            device)
    paths = shard_paths(cfg.shard_dir, split)
    if not paths:
        raise FileNotFoundError(f"no finished {split} shards in {cfg.shard_dir}")
    out = evaluate_model(model, vocab, labels, paths, cfg.eval.ks, cfg.eval.captions_per_image, device=device)
    out.update(split=split, model=ck["model_name"], epoch=ck.get("epoch"))
    with contextlib.ExitStack() as tars:  # shard_recall opens tars by local path: object-store ones are copied
        out.update(shard_recall([tars.enter_context(storage.local(p)) for p in paths]))  # proposal_recall_at_0.5
    return out
