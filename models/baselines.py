"""Baselines on the same data and evaluation as the HM-LSTM.

vse  - flat visual-semantic embedding (Kiros et al. / VSE++): a sentence is the mean of its word vectors or
       a GRU's last state, an image its whole-image feature; no phrases or regions in training.
dvsa - Karpathy & Fei-Fei's deep visual-semantic alignment: a bidirectional RNN gives every word a vector in
       context, every region (and the whole image) a vector, and score(image, sentence) = mean over words of
       the best region's dot product (the paper sums; the mean keeps the hinge margin length-independent).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from densevse.models.base import MODELS, NEG_INF, EmbeddingModel, l2norm, word_embedding


@MODELS.register("vse")
class VSE(EmbeddingModel):
    def __init__(self, vocab_size: int, n_labels: int, feat_dim: int, hidden: int = 256, embed: int = 256,
                 word_init=None, text: str = "gru"):
        super().__init__(vocab_size=vocab_size, n_labels=n_labels, feat_dim=feat_dim, hidden=hidden, embed=embed,
                         text=text)
        self.text = text
        self.words = word_embedding(vocab_size, word_init)
        wd = self.words.embedding_dim
        self.gru = nn.GRU(wd, hidden, batch_first=True) if text == "gru" else None
        self.text_out = nn.Linear(hidden if text == "gru" else wd, embed)
        self.image_out = nn.Linear(feat_dim, embed)

    @classmethod
    def from_config(cls, train_cfg, **dims):
        return cls(hidden=train_cfg.hidden_dim, embed=train_cfg.embed_dim, text=train_cfg.vse_text, **dims)

    def _sentence(self, tokens, lengths):
        if len(tokens) == 0:
            return tokens.new_zeros(0, self.text_out.out_features, dtype=torch.float32)
        w = self.words(tokens)
        if self.gru is None:
            h = w.sum(1) / lengths.clamp(min=1)[:, None]
        else:
            packed = pack_padded_sequence(w, lengths.cpu(), batch_first=True, enforce_sorted=False)
            h = self.gru(packed)[1][0]
        return l2norm(self.text_out(h))

    def encode_texts(self, b) -> dict:
        return {"sentence": self._sentence(b.tokens, b.lengths),
                "phrases": self._sentence(b.phrase_tokens, b.phrase_lengths)}

    def encode_images(self, b) -> dict:
        regions = l2norm(self.image_out(b.feats))
        return {"image": regions[:, 0], "regions": regions, "valid": b.valid, "cand": b.cand}


@MODELS.register("dvsa")
class DVSA(EmbeddingModel):
    def __init__(self, vocab_size: int, n_labels: int, feat_dim: int, hidden: int = 256, embed: int = 256,
                 word_init=None):
        super().__init__(vocab_size=vocab_size, n_labels=n_labels, feat_dim=feat_dim, hidden=hidden, embed=embed)
        self.words = word_embedding(vocab_size, word_init)
        self.brnn = nn.GRU(self.words.embedding_dim, hidden, batch_first=True, bidirectional=True)
        self.word_out = nn.Linear(hidden, embed)  # s_t = relu(W_d (h_fwd + h_bwd) + b_d), as in the paper
        self.image_out = nn.Linear(feat_dim, embed)

    def encode_texts(self, b) -> dict:
        packed = pack_padded_sequence(self.words(b.tokens), b.lengths.cpu(), batch_first=True, enforce_sorted=False)
        h = pad_packed_sequence(self.brnn(packed)[0], batch_first=True, total_length=b.tokens.shape[1])[0]
        fwd, bwd = h.chunk(2, dim=-1)
        words = l2norm(torch.relu(self.word_out(fwd + bwd)))  # (T, L, E)
        mask = b.tokens > 0
        # A phrase's score with a region is the mean of its words' scores = the mean word vector's score.
        pos = b.phrase_span[:, :1] + torch.arange(b.phrase_tokens.shape[1], device=mask.device)[None]
        pmask = pos < b.phrase_span[:, 1:]
        pw = words[b.phrase_caption[:, None], pos.clamp(max=words.shape[1] - 1)] * pmask[..., None]
        phrases = pw.sum(1) / pmask.sum(1, keepdim=True).clamp(min=1)
        sentence = l2norm((words * mask[..., None]).sum(1))  # only for the MLflow model's single vector
        return {"words": words, "word_mask": mask, "phrases": phrases, "sentence": sentence}

    def encode_images(self, b) -> dict:
        regions = l2norm(self.image_out(b.feats))
        return {"image": regions[:, 0], "regions": regions, "valid": b.valid, "cand": b.cand}

    def scores(self, img: dict, txt: dict) -> torch.Tensor:
        s = torch.einsum("bre,tle->btlr", img["regions"], txt["words"])
        s = s.masked_fill(~img["valid"][:, None, None, :], NEG_INF).amax(-1)  # best region per word
        m = txt["word_mask"][None].to(s.dtype)
        return (s * m).sum(-1) / m.sum(-1).clamp(min=1)
