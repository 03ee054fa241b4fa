"""Bidirectional hinge ranking losses (Kiros et al.; VSE++ hardest negatives), at two levels:

    sentence-image   scores (B, T): every caption ranked above other images' captions for its image, and
                     its image above other images for it;
    phrase-image     a phrase's score with an image is its best region's score (multiple-instance: which
                     region a phrase shows is unknown), so each phrase is ranked against the regions of its own
                     and of the other images of the batch, in both directions.
"""
from __future__ import annotations

import torch


def hinge_ranking(scores: torch.Tensor, positive: torch.Tensor, margin: float, hardest: bool = False) -> torch.Tensor:
    """scores (Q, K), positive (Q, K) bool. For every positive pair (q, k): hinge against the negatives
    of row q (q -> k direction) and of column k (k -> q). Sum over negatives, or the hardest one (VSE++)."""
    q, k = positive.nonzero(as_tuple=True)
    if len(q) == 0:
        return scores.sum() * 0
    pos = scores[q, k][:, None]
    row = (margin - pos + scores[q]).clamp(min=0).masked_fill(positive[q], 0)          # (Npos, K)
    col = (margin - pos + scores[:, k].T).clamp(min=0).masked_fill(positive[:, k].T, 0)  # (Npos, Q)
    if hardest:
        return (row.amax(1) + col.amax(1)).mean()
    return (row.sum(1) + col.sum(1)).mean()


def embedding_loss(model, img: dict, txt: dict, batch, margin: float, hardest: bool,
                   phrase_weight: float) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts. `model` is the unwrapped model (its scores/phrase_scores)."""
    B = img["image"].shape[0]
    images = torch.arange(B, device=batch.caption_image.device)
    scores, ps = model.scores_and_phrase_best(img, txt)  # ps (P, B): each phrase's best region of each image
    sent = hinge_ranking(scores, batch.caption_image[None] == images[:, None], margin, hardest)
    parts = {"loss_sentence": sent.detach()}
    loss = sent
    if model.uses_phrase_loss and phrase_weight > 0 and len(batch.phrase_node):
        pos = batch.caption_image[batch.phrase_caption][:, None] == images[None]
        phr = hinge_ranking(ps, pos, margin, hardest)
        parts["loss_phrase"] = phr.detach()
        loss = loss + phrase_weight * phr
    parts["loss"] = loss.detach()
    return loss, parts
