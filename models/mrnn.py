"""Multimodal RNN caption decoder (m-RNN, Mao et al. 2015), for whole-image captions and region phrases.

Per step t, with w(t) the embedded previous word, r(t) the recurrent state and v the projected visual feature:

    r(t) = GRU/LSTM([w(t); v], r(t-1))              # recurrent layer (v here too: see below)
    m(t) = tanh(W_w w(t) + W_r r(t) + v)            # multimodal layer: word, language state and image fused
    p(word(t+1)) = softmax(W_o dropout(m(t)))

v = Linear(LayerNorm(feature)) + a learned "kind" vector (0: whole-image sentence, 1: region phrase), so one
decoder writes a full sentence for row 0 of an image and a short noun phrase for a region. Unlike the original
m-RNN, v also enters the recurrent input: with only the multimodal layer seeing the image, the recurrent state
cannot remember which object it already named, and a two-object caption then tends to name one object twice.

Beyond the paper, with `attention` on: the multimodal layer also sees c(t), a soft attention over a memory of
region features (the image's rows: whole image + regions) queried by r(t), `m(t) = tanh(... + W_c c(t))`. One
pooled feature of a multi-object scene blurs which colour goes with which shape; attending to one region per
noun phrase keeps them bound (as Karpathy & Fei-Fei's region-level descriptions do, but inside one sentence).
A region phrase's memory is just its own row, so it decodes exactly as without attention.

Decoding: `greedy` and batched `beam_search` (beam 7 as in Karpathy & Fei-Fei's DVSA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densevse.models.base import word_embedding
from densevse.models.vocab import PAD, UNK

BOS, EOS = "<bos>", "<eos>"
SPECIALS = [PAD, UNK, BOS, EOS]  # ids 0..3 in every captioner vocabulary
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
SENTENCE, PHRASE = 0, 1  # the "kind" of a description


class MRNN(nn.Module):
    def __init__(self, vocab_size: int, feat_dim: int, embed_dim: int = 128, hidden_dim: int = 256,
                 multimodal_dim: int = 256, cell: str = "gru", dropout: float = 0.2, word_init=None, attention: bool = False):
        super().__init__()
        self.hparams = {"vocab_size": vocab_size, "feat_dim": feat_dim, "embed_dim": embed_dim,
                        "hidden_dim": hidden_dim, "multimodal_dim": multimodal_dim, "cell": cell, "dropout": dropout,
                        "attention": attention}
        self.embed = word_embedding(vocab_size, word_init, embed_dim)
        e = self.hparams["embed_dim"] = self.embed.embedding_dim  # word vectors (GloVe: 50) set it
        self.image = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, multimodal_dim))
        self.kind = nn.Embedding(2, multimodal_dim)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(e + multimodal_dim, hidden_dim, batch_first=True)
        self.mm_word = nn.Linear(e, multimodal_dim)
        self.mm_rnn = nn.Linear(hidden_dim, multimodal_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(multimodal_dim, vocab_size)
        if attention:  # additive attention; the memory shares the image projection
            self.att_query = nn.Linear(hidden_dim, multimodal_dim)
            self.att_score = nn.Linear(multimodal_dim, 1)
            self.mm_ctx = nn.Linear(multimodal_dim, multimodal_dim)

    def visual(self, feats: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """(N, D) features and (N,) kinds -> (N, M) the v added at every step."""
        return self.image(feats) + self.kind(kind)

    def memory(self, feats: torch.Tensor, memory: torch.Tensor | None, mask: torch.Tensor | None):
        """Projected attention memory (N, R, M) and its mask (N, R); None without attention. No memory given:
        each input attends to its own feature only."""
        if not self.hparams.get("attention"):
            return None
        if memory is None:
            memory, mask = feats[:, None], None
        mem = self.image(memory)
        if mask is None:
            mask = torch.ones(mem.shape[:2], dtype=torch.bool, device=mem.device)
        return mem, mask

    def _step(self, words: torch.Tensor, v: torch.Tensor, state=None, mem=None):
        """words (N, T) ids, v (N, M), mem from `memory` -> log-probs (N, T, V), new recurrent state."""
        w = self.drop(self.embed(words))
        vt = v[:, None].expand(-1, words.shape[1], -1)
        r, state = self.rnn(torch.cat([w, vt], -1), state)
        pre = self.mm_word(w) + self.mm_rnn(r) + vt
        if mem is not None:
            values, mask = mem                                                       # (N, R, M), (N, R)
            e = self.att_score(torch.tanh(values[:, None] + self.att_query(r)[:, :, None])).squeeze(-1)
            a = e.masked_fill(~mask[:, None], float("-inf")).softmax(-1)            # (N, T, R)
            pre = pre + self.mm_ctx(a @ values)
        m = torch.tanh(pre)
        return F.log_softmax(self.out(self.drop(m)), -1), state

    def forward(self, feats: torch.Tensor, kind: torch.Tensor, tokens: torch.Tensor,
                memory: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced mean token NLL. tokens (N, L): word ids, 0-padded, without BOS/EOS; memory (N, R, D)
        the features to attend over, mask (N, R) which of them are real (default: feats alone)."""
        n = tokens.shape[0]
        lengths = (tokens != PAD_ID).sum(1)
        bos = torch.full((n, 1), BOS_ID, dtype=tokens.dtype, device=tokens.device)
        inp = torch.cat([bos, tokens], 1)
        target = torch.cat([tokens, torch.zeros_like(bos)], 1)
        target[torch.arange(n, device=tokens.device), lengths] = EOS_ID
        logp, _ = self._step(inp, self.visual(feats, kind), mem=self.memory(feats, memory, mask))
        return F.nll_loss(logp.reshape(-1, logp.shape[-1]), target.reshape(-1), ignore_index=PAD_ID)

    @torch.no_grad()
    def greedy(self, feats: torch.Tensor, kind: torch.Tensor, max_len: int = 20, memory=None,
               mask=None) -> list[tuple[list[int], float]]:
        return self.beam_search(feats, kind, beam=1, max_len=max_len, memory=memory, mask=mask)

    @torch.no_grad()
    def beam_search(self, feats: torch.Tensor, kind: torch.Tensor, beam: int = 7, max_len: int = 20,
                    memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    no_repeat_ngram: int = 0) -> list[tuple[list[int], float]]:
        """Per input: (word ids without BOS/EOS, total log-prob) of the best of `beam` hypotheses.

        All inputs decode together: the state is (N*K, ...); a finished hypothesis only extends with PAD at no
        cost, so it keeps its score while the others grow. Decoding stops once every input's best hypothesis
        has ended. `no_repeat_ngram` n > 0: no hypothesis may contain the same n-gram twice (stops a weak
        model's loops: "a man in a blue shirt and a blue shirt and ...")."""
        n, k = feats.shape[0], beam
        v = self.visual(feats, kind).repeat_interleave(k, 0)                  # (N*K, M)
        mem = self.memory(feats, memory, mask)
        if mem is not None:
            mem = tuple(x.repeat_interleave(k, 0) for x in mem)
        scores = torch.full((n, k), float("-inf"), device=feats.device)
        scores[:, 0] = 0.0                                                      # one live beam at the start
        words = torch.full((n * k, 1), BOS_ID, dtype=torch.long, device=feats.device)
        seqs = torch.zeros((n, k, 0), dtype=torch.long, device=feats.device)
        done = torch.zeros((n, k), dtype=torch.bool, device=feats.device)
        state = None
        for _ in range(max_len):
            logp, state = self._step(words, v, state, mem)
            logp = logp[:, -1].view(n, k, -1)
            logp[..., UNK_ID] = float("-inf")  # never write <unk>
            if no_repeat_ngram and seqs.shape[-1] >= no_repeat_ngram:
                block_repeats(logp.view(n * k, -1), seqs.view(n * k, -1), no_repeat_ngram)
            ended = torch.full_like(logp, float("-inf"))
            ended[..., PAD_ID] = 0.0
            logp = torch.where(done[..., None], ended, logp)
            vocab = logp.shape[-1]
            top, idx = (scores[..., None] + logp).view(n, -1).topk(k, -1)
            src, tok = idx // vocab, idx % vocab
            scores = top
            seqs = torch.cat([seqs.gather(1, src[..., None].expand(-1, -1, seqs.shape[-1])), tok[..., None]], -1)
            done = done.gather(1, src) | (tok == EOS_ID) | (tok == PAD_ID)
            flat = (src + torch.arange(n, device=feats.device)[:, None] * k).view(-1)
            state = tuple(s[:, flat] for s in state) if isinstance(state, tuple) else state[:, flat]
            words = tok.view(-1, 1)
            if done[:, 0].all():  # every best hypothesis ended: live ones score lower and can only drop
                break
        out = []
        for i in range(n):
            ids = [t for t in seqs[i, 0].tolist() if t not in (PAD_ID, BOS_ID)]
            ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
            out.append((ids, float(scores[i, 0])))
        return out


def block_repeats(logp: torch.Tensor, seqs: torch.Tensor, n: int) -> None:
    """In place: for each row, -inf at every token that would complete an n-gram already in seqs (rows, L)."""
    prefix = seqs[:, -(n - 1):] if n > 1 else seqs[:, :0]                # the n-1 tokens a new one would follow
    windows = seqs.unfold(1, n, 1)                                         # (rows, L-n+1, n) earlier n-grams
    hit = (windows[..., :-1] == prefix[:, None]).all(-1)                   # (rows, L-n+1) same prefix
    rows, pos = hit.nonzero(as_tuple=True)
    logp[rows, windows[rows, pos, -1]] = float("-inf")
