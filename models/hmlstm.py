"""Hierarchical multimodal LSTM (Niu et al., "Hierarchical Multimodal LSTM for Dense Visual-Semantic
Embedding", ICCV 2017).

Both modalities are trees embedded by a child-sum tree-LSTM into one space:

    text:   words -> phrases -> sentence   (the caption's constituency tree)
    image:  regions -> whole image         (a two-level tree: every region is a child of the image node)

A node's state summarises its subtree, so phrase embeddings are the tree-LSTM states of phrase nodes and
the sentence embedding is the root's. A region's input is its feature plus its box relative to the image.
Phrase-region similarity is the cosine of the projected states; sentence-image similarity uses both levels:
cosine(sentence, image) + mean over the sentence's phrases of the best phrase-region cosine. Training ranks
sentences against images and phrases against regions (models/losses.py).

The tree-LSTM is batched level by level: nodes of equal height (across all trees of a batch) depend only on
lower levels, so each level is one matrix multiply plus index_add over its child edges. A batch of 128
captions takes ~8 steps instead of ~2000 per-node calls. `forward_naive` is the textbook recursion, kept as
the reference the tests and the benchmark compare against.
"""
from __future__ import annotations

import torch
from torch import nn

from densevse.models.base import MODELS, EmbeddingModel, l2norm, word_embedding


class ChildSumTreeLSTM(nn.Module):
    """Child-sum tree-LSTM (Tai et al. 2015): children are summed, with one forget gate per child.

        i, o, u = sigma/sigma/tanh(W x_j + U sum_k h_k + b)      f_jk = sigma(W_f x_j + U_f h_k + b_f)
        c_j = i * u + sum_k f_jk * c_k                            h_j = o * tanh(c_j)
    """

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.W = nn.Linear(in_dim, 4 * hidden)                # i, o, u, f from the node's own input
        self.U_iou = nn.Linear(hidden, 3 * hidden, bias=False)  # from the sum of the children's h
        self.U_f = nn.Linear(hidden, hidden, bias=False)        # per child, from that child's h

    def forward(self, x: torch.Tensor, parent: torch.Tensor, height: torch.Tensor):
        """x (N, in) for the nodes of many trees, parent (N,) global index or -1, height (N,).
        Returns h, c (N, hidden)."""
        N, Hd = x.shape[0], self.hidden
        wx = self.W(x)
        h_all = x.new_zeros(N, Hd)
        c_all = x.new_zeros(N, Hd)
        slot = torch.empty(N, dtype=torch.long, device=x.device)  # a node's row within its level
        has_parent = parent >= 0
        parent_height = torch.where(has_parent, height[parent.clamp(min=0)], -1)
        for level in range(int(height.max()) + 1 if N else 0):
            nodes = (height == level).nonzero().squeeze(1)
            slot[nodes] = torch.arange(len(nodes), device=x.device)
            iou, f_x = wx[nodes, :3 * Hd], wx[nodes, 3 * Hd:]
            fc = x.new_zeros(len(nodes), Hd)
            if level > 0:
                kids = (parent_height == level).nonzero().squeeze(1)  # child edges into this level
                at = slot[parent[kids]]
                h_kids, c_kids = h_all[kids], c_all[kids]
                iou = iou + self.U_iou(x.new_zeros(len(nodes), Hd).index_add(0, at, h_kids))
                f = torch.sigmoid(f_x[at] + self.U_f(h_kids))
                fc = fc.index_add(0, at, f * c_kids)
            i, o, u = iou.chunk(3, dim=1)
            c = torch.sigmoid(i) * torch.tanh(u) + fc
            h = torch.sigmoid(o) * torch.tanh(c)
            h_all = h_all.index_copy(0, nodes, h)
            c_all = c_all.index_copy(0, nodes, c)
        return h_all, c_all

    def node(self, x: torch.Tensor, kids: list[tuple[torch.Tensor, torch.Tensor]]):
        """One node from its input (in,) and its children's (h, c): the per-node textbook step."""
        Hd = self.hidden
        wx = self.W(x)
        iou, f_x = wx[:3 * Hd], wx[3 * Hd:]
        c = torch.zeros(Hd, dtype=x.dtype, device=x.device)
        if kids:
            iou = iou + self.U_iou(sum(h for h, _ in kids))
            for h_k, c_k in kids:
                c = c + torch.sigmoid(f_x + self.U_f(h_k)) * c_k
        i, o, u = iou.chunk(3)
        c = torch.sigmoid(i) * torch.tanh(u) + c
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward_naive(self, x: torch.Tensor, parent: torch.Tensor, height: torch.Tensor | None = None):
        """Reference: recursive, one node at a time. Same result as forward()."""
        par = parent.tolist()
        kids: list[list[int]] = [[] for _ in par]
        for j, p in enumerate(par):
            if p >= 0:
                kids[p].append(j)
        out: dict[int, tuple] = {}

        def visit(j: int):
            if j not in out:
                out[j] = self.node(x[j], [visit(k) for k in kids[j]])
            return out[j]

        for j, p in enumerate(par):
            if p < 0:
                visit(j)
        h = torch.stack([out[j][0] for j in range(len(par))]) if par else x.new_zeros(0, self.hidden)
        c = torch.stack([out[j][1] for j in range(len(par))]) if par else x.new_zeros(0, self.hidden)
        return h, c


def geometry(boxes: torch.Tensor) -> torch.Tensor:
    """(B, R, 4) xyxy pixel boxes -> (B, R, 5) [x0, y0, x1, y1, area] relative to the whole image (row 0), so
    relation phrases ("left of", "above") have something to match."""
    wh = (boxes[:, :1, 2:] - boxes[:, :1, :2]).clamp(min=1)
    rel = (boxes - boxes[:, :1, :2].repeat(1, 1, 2)) / wh.repeat(1, 1, 2)
    area = (rel[..., 2] - rel[..., 0]) * (rel[..., 3] - rel[..., 1])
    return torch.cat([rel, area[..., None]], dim=2)


@MODELS.register("hmlstm")
class HMLSTM(EmbeddingModel):
    uses_phrase_loss = True
    label_dim = 16

    def __init__(self, vocab_size: int, n_labels: int, feat_dim: int, hidden: int = 256, embed: int = 256,
                 word_init=None, naive: bool = False, text_tree: str = "parse", phrase_score: bool = True,
                 region_tree: bool = True):
        super().__init__(vocab_size=vocab_size, n_labels=n_labels, feat_dim=feat_dim, hidden=hidden, embed=embed,
                         text_tree=text_tree, phrase_score=phrase_score, region_tree=region_tree)
        self.naive = naive  # benchmark switch: recursive instead of level-batched tree-LSTM
        self.phrase_score = phrase_score  # the sentence-image score adds the phrases' best region match (ablation: off)
        self.caption_tree = text_tree  # the captions' tree (trees.restructure): collate builds batches with it
        self.words = word_embedding(vocab_size, word_init)
        self.labels = nn.Embedding(n_labels, self.label_dim)  # POS tag / phrase label of each node
        self.text_tree = ChildSumTreeLSTM(self.words.embedding_dim + self.label_dim, hidden)
        self.text_out = nn.Linear(hidden, embed)
        # + where the region is (see geometry). Ablation (region_tree False): every row projected linearly, as VSE's image
        self.image_tree = ChildSumTreeLSTM(feat_dim + 5, hidden) if region_tree else None
        self.image_out = nn.Linear(hidden if region_tree else feat_dim + 5, embed)

    @classmethod
    def from_config(cls, train_cfg, **dims):
        return cls(hidden=train_cfg.hidden_dim, embed=train_cfg.embed_dim, text_tree=train_cfg.text_tree,
                   phrase_score=train_cfg.phrase_score, region_tree=train_cfg.region_tree, **dims)

    def _tree(self, cell, x, parent, height):
        return (cell.forward_naive if self.naive else cell)(x, parent, height)[0]

    def encode_texts(self, b) -> dict:
        # Word nodes read their word vector, phrase nodes only their label (node_word = 0 = pad -> zeros).
        x = torch.cat([self.words(b.node_word), self.labels(b.node_label)], dim=1)
        h = self.text_out(self._tree(self.text_tree, x, b.parent, b.height))
        return {"sentence": l2norm(h[b.root]), "phrases": l2norm(h[b.phrase_node]), "phrase_caption": b.phrase_caption}

    def scores(self, img: dict, txt: dict) -> torch.Tensor:
        return self.scores_and_phrase_best(img, txt)[0]

    def scores_and_phrase_best(self, img: dict, txt: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentence-image score = global match (root vs image node) + mean over the sentence's phrases of the
        best phrase-region match: the hierarchy scores the pair at every level, not only at the top."""
        glob = img["image"] @ txt["sentence"].T                      # (B, T)
        T = glob.shape[1]
        best = self.phrase_scores(img, txt).amax(-1)                 # (P, B)
        if not self.phrase_score:
            return glob, best
        per_cap = best.new_zeros(T, best.shape[1]).index_add(0, txt["phrase_caption"], best)
        count = torch.bincount(txt["phrase_caption"], minlength=T).clamp(min=1).to(best.dtype)
        return glob + (per_cap / count[:, None]).T, best

    @staticmethod
    def _region_links(b, rows):
        """The image tree over the real rows `rows` (flat b*R + r): each row's parent (a region's is its image's
        row 0, an image's -1) and height (an image's is 1 when it has regions)."""
        B, R, _ = b.feats.shape
        gidx = torch.full((B * R,), -1, dtype=torch.long, device=rows.device)
        gidx[rows] = torch.arange(len(rows), device=rows.device)
        r_of = rows % R
        parent = torch.where(r_of > 0, gidx[rows - r_of], -1)
        height = torch.where(r_of == 0, (b.valid.sum(1)[rows // R] > 1).long(), 0)
        return parent, height

    def encode_images(self, b) -> dict:
        B, R, _ = b.feats.shape
        rows = b.valid.reshape(-1).nonzero().squeeze(1)  # flat (b*R + r) index of every real row
        h = torch.cat([b.feats, geometry(b.boxes)], dim=2).reshape(B * R, -1)[rows]
        if self.image_tree is not None:  # without it (ablation) every row is projected alone
            h = self._tree(self.image_tree, h, *self._region_links(b, rows))
        e = l2norm(self.image_out(h))
        regions = e.new_zeros(B * R, e.shape[1]).index_copy(0, rows, e).view(B, R, -1)
        return {"image": regions[:, 0], "regions": regions, "valid": b.valid, "cand": b.cand}
