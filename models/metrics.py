"""Every metric in one place, as pure numpy functions: retrieval ranks and recall, box IoU, proposal recall and
phrase grounding, caption scores.

Retrieval follows the VSE++ protocol with 5 captions per image: an image's image-to-text rank is the best rank
among its captions; a caption's text-to-image rank is the rank of its image. Reported: R@1/5/10, median and
mean rank, both directions, and rsum (sum of the six recalls, used to pick the best epoch).
Phrase grounding: a phrase's best-scoring candidate region is correct if its IoU with the phrase's gold box
is >= 0.5.
Captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, COCO's PTBTokenizer; METEOR and the tokenizer run
Java), and, where images carry gold object labels, object precision / recall of the words a caption uses.
"""
from __future__ import annotations

import numpy as np


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


def recall_folds(scores: np.ndarray, caption_image: np.ndarray, ks=(1, 5, 10), fold_images: int = 1000) -> dict:
    """COCO's 1K protocol: recall_at_k on each fold of `fold_images` consecutive images (with their captions),
    averaged over the folds (5 folds of the 5K test images); "folds" says how many. With one fold of every
    image it is the 5K protocol, i.e. recall_at_k itself. A last fold shorter than `fold_images` is refused:
    its recall would not be comparable."""
    scores, caption_image = np.asarray(scores), np.asarray(caption_image)
    n_img = scores.shape[0]
    if n_img % fold_images:
        raise ValueError(f"{n_img} images do not split into folds of {fold_images}")
    folds = []
    for f in range(n_img // fold_images):
        lo, hi = f * fold_images, (f + 1) * fold_images
        caps = np.flatnonzero((caption_image >= lo) & (caption_image < hi))
        folds.append(recall_at_k(scores[lo:hi][:, caps], caption_image[caps] - lo, ks))
    out = {k: float(np.mean([r[k] for r in folds])) for k in folds[0]}
    out["folds"] = len(folds)
    return out


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired xyxy boxes: (N,) for a (N,4), b (N,4)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
    h = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]).clip(min=0) * (x[:, 3] - x[:, 1]).clip(min=0)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


# ---------------------------------------------------------------- boxes

def grounding_accuracy(pred_boxes, gold_boxes, thr: float = 0.5) -> float:
    if len(pred_boxes) == 0:
        return float("nan")
    return 100.0 * float(np.mean(paired_iou(pred_boxes, gold_boxes) >= thr))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _one_image(x) -> bool:
    """True for one image's boxes ((N,4) or []), False for a sequence of per-image box arrays."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except ValueError:  # ragged: per-image arrays of different lengths
        return False
    return (a.ndim == 2 and a.shape[1] == 4) or (a.ndim == 1 and a.size in (0, 4))


def proposal_recall(gold_boxes, pred_boxes, iou: float = 0.5, top_k: int = 19) -> float:
    """Fraction of gold boxes hit (IoU >= iou) by one of the first top_k predicted boxes.

    Either one image ((G,4) gold, (P,4) predictions in score order) or sequences of those, one per image
    (micro-averaged over all gold boxes). Pass predictions without the whole-image row 0. NaN when no gold.
    """
    if _one_image(gold_boxes):
        gold_boxes, pred_boxes = [gold_boxes], [pred_boxes]
    if len(gold_boxes) != len(pred_boxes):
        raise ValueError(f"{len(gold_boxes)} gold images but {len(pred_boxes)} prediction images")
    hit = total = 0
    for g, p in zip(gold_boxes, pred_boxes):
        g = np.asarray(g, np.float64).reshape(-1, 4)
        p = np.asarray(p, np.float64).reshape(-1, 4)[:top_k]
        total += len(g)
        if len(g) and len(p):
            hit += int((box_iou(g, p).max(axis=1) >= iou).sum())
    return hit / total if total else float("nan")


AR_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # COCO's 0.5:0.95


def recall_table(gold_boxes, pred_boxes, ks=(19, 100), ious=(0.5, 0.7), ar_k: int = 100) -> dict[str, float]:
    """Proposal recall for every (top k, IoU) pair, `recall@{iou}_top{k}`, and `AR@{ar_k}`: the recall at the
    top ar_k averaged over IoU 0.5:0.95 (COCO's average recall). Per-image sequences as in proposal_recall
    (score order, micro-averaged over gold boxes); each image's IoU matrix is computed once."""
    best: dict[int, list] = {k: [] for k in {*ks, ar_k}}
    for g, p in zip(gold_boxes, pred_boxes, strict=True):
        g = np.asarray(g, np.float64).reshape(-1, 4)
        iou = box_iou(g, np.asarray(p, np.float64).reshape(-1, 4)[:max(best)])
        for k in best:
            best[k].append(iou[:, :k].max(axis=1) if iou[:, :k].size else np.zeros(len(g)))
    best = {k: np.concatenate(v) if v else np.zeros(0) for k, v in best.items()}
    rec = lambda k, t: float((best[k] >= t).mean()) if best[k].size else float("nan")  # noqa: E731
    out = {f"recall@{t:g}_top{k}": rec(k, t) for k in ks for t in ious}
    out[f"AR@{ar_k}"] = float(np.mean([rec(ar_k, t) for t in AR_IOUS]))
    return out


# ---------------------------------------------------------------- captions

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def coco_scores(refs: dict[str, list[str]], systems: dict[str, dict[str, str]]) -> dict[str, dict[str, float]]:
    """pycocoevalcap corpus scores of each system's hyps[key] against refs[key]: {system: {metric: score}}.
    One tokenizer pass and one METEOR process serve every system (each Java start costs seconds)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({f"{name}\t{k}": [{"caption": h or "."}] for name, hyps in systems.items()
                        for k, h in hyps.items()})
    meteor, out = Meteor(), {}
    for name, hyps in systems.items():
        g = {k: gts[k] for k in sorted(hyps)}
        r = {k: res[f"{name}\t{k}"] for k in sorted(hyps)}
        scores = dict(zip(METRICS[:4], map(float, Bleu(4).compute_score(g, r, verbose=0)[0])))
        for scorer, metric in ((meteor, "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")):
            scores[metric] = float(scorer.compute_score(g, r)[0])
        out[name] = scores
    return out


def nearest_captions(train_feats: np.ndarray, train_captions: list[str], test_feats: np.ndarray) -> list[str]:
    """For each test row, the caption of the training row with the highest cosine similarity."""
    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    best = (unit(test_feats) @ unit(train_feats).T).argmax(1)
    return [train_captions[i] for i in best]


def _objects(label: str) -> tuple[str, str]:
    """"small red circle" -> ("red", "circle"): the last two words of a gold label."""
    w = label.split()
    return w[-2], w[-1]


def object_precision(texts: list[str], labels: list[list[str]]) -> float:
    """Share of (colour, shape) word pairs in the texts that match an object of their image (NaN: none named)."""
    nouns = {_objects(lab)[1] for labs in labels for lab in labs}
    hit = total = 0
    for text, labs in zip(texts, labels):
        words = text.split()
        real = {_objects(lab) for lab in labs}
        for a, b in zip(words, words[1:]):
            if b in nouns:
                total += 1
                hit += (a, b) in real
    return 100.0 * hit / total if total else float("nan")


def object_recall(texts: list[str], labels: list[list[str]]) -> float:
    """Share of the images' objects whose "colour shape" appears in their text."""
    hit = total = 0
    for text, labs in zip(texts, labels):
        for lab in labs:
            total += 1
            hit += " ".join(_objects(lab)) in text
    return 100.0 * hit / total if total else float("nan")
