"""What every model (HM-LSTM and the baselines) provides, so training, evaluation and the MLflow model
treat them alike.

    img = model.encode_images(batch)   # dict: "image" (B,E), "regions" (B,R,E), "valid"/"cand" masks
    txt = model.encode_texts(batch)    # dict: "sentence" (T,E), "phrases" (P,E), ...
    model.scores(img, txt)             # (B, T) image-sentence similarity
    model.phrase_scores(img, txt)      # (P, B, R) phrase-region similarity, -inf off the candidate regions
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densevse.models.registry import Registry

NEG_INF = float("-inf")
MODELS: Registry = Registry("model")  # train.model names one of these


class EmbeddingModel(nn.Module):
    uses_phrase_loss = False  # whether the phrase-region ranking loss trains this model

    def __init__(self, **hparams):
        super().__init__()
        # Constructor arguments, stored in checkpoints to rebuild the model. The word-vector init is not: the
        # trained weights replace it, and a checkpoint of plain values loads with weights_only=True.
        self.hparams = {**hparams, "word_init": None} if "word_init" in hparams else hparams

    @classmethod
    def from_config(cls, train_cfg, *, vocab_size: int, n_labels: int, feat_dim: int, word_init=None):
        return cls(vocab_size=vocab_size, n_labels=n_labels, feat_dim=feat_dim, hidden=train_cfg.hidden_dim,
                   embed=train_cfg.embed_dim, word_init=word_init)

    def forward(self, batch) -> tuple[dict, dict]:
        """Both encoders in one call, so DDP sees every parameter used inside forward()."""
        return self.encode_images(batch), self.encode_texts(batch)

    def scores(self, img: dict, txt: dict) -> torch.Tensor:
        return img["image"] @ txt["sentence"].T

    def scores_and_phrase_best(self, img: dict, txt: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """scores (B, T) and, for a model trained with the phrase loss, each phrase's best region score per
        image (P, B): one call, so a model whose sentence scores use its phrases computes them once per step."""
        best = self.phrase_scores(img, txt).amax(-1) if self.uses_phrase_loss else None
        return self.scores(img, txt), best

    def phrase_scores(self, img: dict, txt: dict) -> torch.Tensor:
        s = torch.einsum("pe,bre->pbr", txt["phrases"], img["regions"])
        return s.masked_fill(~img["cand"][None], NEG_INF)


def word_embedding(vocab_size: int, word_init, dim: int = 50) -> nn.Embedding:
    """Word vectors initialised from GloVe (word_init: (V, dim) array) and fine-tuned."""
    if word_init is not None:
        word_init = torch.as_tensor(word_init, dtype=torch.float32)
        dim = word_init.shape[1]
    emb = nn.Embedding(vocab_size, dim, padding_idx=0)
    if word_init is not None:
        with torch.no_grad():
            emb.weight.copy_(word_init)
            emb.weight[0].zero_()
    return emb


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)
