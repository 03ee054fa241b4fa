"""A trained m-RNN captioner, ready to describe feature vectors, and the dense description built from region
phrases (HM-LSTM's "dense descriptions"). Training lives in pipeline/training/captioner.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from densevse.models.checkpoint import load_checkpoint
from densevse.models.metrics import box_iou
from densevse.models.mrnn import MRNN, PHRASE, SENTENCE
from densevse.models.vocab import Vocab

MODEL_NAME = "mrnn"  # a captioner checkpoint's model_name


def pad_images(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_i, D) feature arrays -> (N, R_max, D) float tensor and its (N, R_max) mask of real rows."""
    r = max(len(f) for f in images)
    feats = torch.zeros(len(images), r, images[0].shape[1])
    for i, f in enumerate(images):
        feats[i, :len(f)] = torch.from_numpy(np.asarray(f, np.float32))
    return feats, torch.arange(r)[None] < torch.tensor([len(f) for f in images])[:, None]


def new_mrnn(vocab_size: int, feat_dim: int, *, hidden_dim: int, cell: str, dropout: float, attention: bool,
             word_init=None) -> MRNN:
    """A fresh m-RNN as the captioner trains it: the multimodal layer as wide as the recurrent state.
    word_init: (vocab_size, dim) starting word vectors (GloVe), else random."""
    return MRNN(vocab_size, feat_dim, hidden_dim=hidden_dim, multimodal_dim=hidden_dim, cell=cell, dropout=dropout,
                word_init=word_init, attention=attention)


class Captioner:
    """A trained checkpoint, ready to write descriptions of feature vectors."""

    def __init__(self, model: MRNN, vocab: Vocab, ck: dict, device="cpu"):
        self.model, self.vocab, self.ck, self.device = model.eval(), vocab, ck, device
        # Without phrase training pairs the PHRASE kind is untrained: regions get the sentence decoder.
        self.phrase_kind = PHRASE if ck.get("phrase_pairs", 0) > 0 else SENTENCE

    @classmethod
    def from_checkpoint(cls, ck: dict, device="cpu") -> "Captioner":
        """From a checkpoint dict (models.checkpoint.load_checkpoint) whose model_name is MODEL_NAME."""
        model = MRNN(**ck["hparams"]).to(device)
        model.load_state_dict(ck["state_dict"])
        return cls(model, Vocab(ck["vocab"]), ck, device)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "Captioner":
        """A checkpoint file, for code that loads without the pipeline (the registered model); a run's
        checkpoints by name or directory: pipeline.trained.load_trained."""
        return cls.from_checkpoint(load_checkpoint(path, device), device)

    def describe(self, feats, kind: int, beam: int = 7, max_len: int = 24, batch: int = 256,
                 images: list | None = None, no_repeat_ngram: int = 3) -> list[tuple[str, float]]:
        """(text, confidence) per feature row; confidence = exp(mean log-prob per word, EOS included).
        `images`, one (R, D) array per row: what each row's description attends over (default: the row)."""
        d = self.model.hparams["feat_dim"]
        feats = torch.as_tensor(np.asarray(feats, np.float32)).reshape(-1, d)
        if images is not None:
            images = [np.asarray(f, np.float32) for f in images]
            bad = [f.shape for f in images if f.ndim != 2 or len(f) == 0 or f.shape[1] != d]
            if len(images) != len(feats) or bad:
                raise ValueError(f"images must be one (R, {d}) array with R >= 1 per feature row "
                                 f"({len(feats)}); got {len(images)} arrays, bad shapes {bad[:3]}")
        out = []
        for i in range(0, len(feats), batch):
            f = feats[i:i + batch].to(self.device)
            k = torch.full((len(f),), kind, dtype=torch.long, device=self.device)
            mem = mask = None
            if images is not None:
                mem, mask = (x.to(self.device) for x in pad_images(images[i:i + batch]))
            for ids, logp in self.model.beam_search(f, k, beam=beam, max_len=max_len, memory=mem, mask=mask,
                                                    no_repeat_ngram=no_repeat_ngram):
                out.append((" ".join(self.vocab.words[t] for t in ids), float(np.exp(logp / (len(ids) + 1)))))
        return out

    def caption(self, images: list, beam: int = 7, max_len: int = 24, no_repeat_ngram: int = 3) -> list[tuple[str, float]]:
        """Whole-image (text, confidence) per image, from its (R, D) feature rows (row 0 = the whole image)."""
        return self.describe(np.stack([np.asarray(f)[0] for f in images]), SENTENCE, beam, max_len, images=images,
                             no_repeat_ngram=no_repeat_ngram)


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
    kept: list[np.ndarray] = []
    for b in np.asarray(boxes, np.float32).reshape(-1, 4):
        if len(kept) == k:
            break
        if not kept or box_iou(b[None], np.stack(kept)).max() <= iou:
            kept.append(b)
    return np.stack(kept) if kept else np.zeros((0, 4), np.float32)
