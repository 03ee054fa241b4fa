"""(image, captions) items -> the flat, level-batchable tensors the models take.

A batch holds B distinct images and T captions (caption_image[t] says which image). Trees of all captions are
concatenated into one node list (global indices), so the tree-LSTM can process equal-height nodes of every
tree in one step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from densevse.models import trees
from densevse.models.vocab import Vocab, normalize


def caption_tokens(caption: dict) -> list[str]:
    return [normalize(t) for t in caption["tree"]["tokens"]]


@dataclass
class Batch:
    keys: list[str]
    feats: torch.Tensor        # (B, R, D) region features, row 0 = whole image
    boxes: torch.Tensor        # (B, R, 4) xyxy pixels
    valid: torch.Tensor        # (B, R) real rows (regions are padded to the batch max)
    cand: torch.Tensor         # (B, R) rows a phrase may ground to: the regions, or row 0 if there are none
    caption_image: torch.Tensor  # (T,) image of each caption
    caption_index: list[int]
    tokens: torch.Tensor       # (T, L) word ids, 0 = pad
    lengths: torch.Tensor      # (T,)
    node_word: torch.Tensor    # (N,) word id of word nodes, 0 for phrase nodes
    node_label: torch.Tensor   # (N,) label id (POS tag or phrase label)
    parent: torch.Tensor       # (N,) global parent index, -1 for roots
    height: torch.Tensor       # (N,) 0 for words
    root: torch.Tensor         # (T,) global index of each caption's root
    word_node: torch.Tensor    # (T, L) global node index of each token, -1 = pad
    phrase_node: torch.Tensor  # (P,) global node index of each phrase
    phrase_caption: torch.Tensor  # (P,)
    phrase_tokens: torch.Tensor   # (P, Lp) word ids of each phrase's span
    phrase_lengths: torch.Tensor  # (P,)
    phrase_span: torch.Tensor     # (P, 2) token span [start, end) in its caption
    phrase_text: list[str] = field(default_factory=list)
    gold: list[tuple[int, list[float]]] = field(default_factory=list)  # (phrase p, gold box of p's image)

    def to(self, device) -> "Batch":
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device, non_blocking=True))
        return self


def gold_nodes(caption: dict, gold: dict) -> list[tuple[int, int]]:
    """Gold links of a caption as (node, box). Links are [node, box] or [start, end, box] (token span)."""
    links = (gold or {}).get("links", {}).get(str(caption["index"]), [])
    tree = caption["tree"]
    n = len(tree["tokens"])
    out = []
    for link in links:
        if len(link) == 2:
            out.append((int(link[0]), int(link[1])))
        else:
            s, e, box = link
            nodes = [i for i in range(n, len(tree["labels"])) if tree["spans"][i] == [s, e]]
            nodes = nodes or [i for i in range(len(tree["labels"])) if tree["spans"][i] == [s, e]]
            if nodes:
                out.append((nodes[0], int(box)))
    return out


def _regions(items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feats (B,R,D), boxes (B,R,4), valid (B,R), cand (B,R)): regions padded to the batch's most. A phrase
    may ground to any region, or to row 0 (the whole image) when the image has no other."""
    B, R = len(items), max(s["feats"].shape[0] for s, _ in items)
    feats = torch.zeros(B, R, items[0][0]["feats"].shape[1])
    boxes = torch.zeros(B, R, 4)
    valid = torch.zeros(B, R, dtype=torch.bool)
    for b, (s, _) in enumerate(items):
        r = s["feats"].shape[0]
        feats[b, :r] = torch.from_numpy(s["feats"])
        boxes[b, :r] = torch.from_numpy(s["boxes"])
        valid[b, :r] = True
    cand = valid.clone()
    cand[:, 0] = valid.sum(1) == 1
    return feats, boxes, valid, cand


def _padded(rows: list[list[int]], fill: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), max((len(x) for x in rows), default=1)), fill, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def collate(items: list[tuple[dict, list[dict]]], vocab: Vocab, labels: Vocab, text_tree: str = "parse") -> Batch:
    """Items (sample, [its captions]) -> one Batch: every tree's nodes in one global list (offsets per
    caption), its phrases (trees.phrases plus any gold-linked node), and gold (phrase, box) pairs. `text_tree`
    other than "parse" replaces each caption's tree by a branching one over its words (trees.restructure;
    gold links, which name parse nodes, are then dropped)."""
    feats, boxes, valid, cand = _regions(items)
    cap_img, cap_idx, toks, node_word, node_label, parent, height, root = [], [], [], [], [], [], [], []
    ph_node, ph_cap, ph_toks, ph_text, gold, word_nodes, ph_span = [], [], [], [], [], [], []
    offset = 0
    for b, (s, caps) in enumerate(items):
        gboxes = (s["meta"].get("gold") or {}).get("boxes", [])
        for c in caps:
            t, tree = len(cap_img), trees.restructure(c["tree"], text_tree)
            n, m = len(tree["tokens"]), len(tree["labels"])
            ids = [vocab(normalize(w)) for w in tree["tokens"]]
            cap_img.append(b)
            cap_idx.append(int(c["index"]))
            toks.append(ids)
            word_nodes.append(list(range(offset, offset + n)))  # words are a tree's first nodes
            node_word += ids + [0] * (m - n)
            node_label += [labels(lab) for lab in tree["labels"]]
            parent += [p + offset if p >= 0 else -1 for p in tree["parents"]]
            height += trees.heights(tree)
            root.append(offset + m - 1)
            links = gold_nodes(c, s["meta"].get("gold")) if text_tree == "parse" else []
            nodes = [p["node"] for p in (c.get("phrases") or trees.phrases(tree) if text_tree == "parse"
                                         else trees.phrases(tree, frozenset({trees.BRANCH_LABEL})))]
            nodes += [nd for nd, _ in links if nd not in nodes]
            where = {}
            for nd in nodes:
                where[nd] = len(ph_node)
                st, en = tree["spans"][nd]
                ph_node.append(offset + nd)
                ph_cap.append(t)
                ph_toks.append(ids[st:en])
                ph_span.append([st, en])
                ph_text.append(" ".join(tree["tokens"][st:en]))
            gold += [(where[nd], gboxes[bx]) for nd, bx in links if bx < len(gboxes)]
            offset += m
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(keys=[s["key"] for s, _ in items], feats=feats, boxes=boxes, valid=valid, cand=cand,
                 caption_image=long(cap_img), caption_index=cap_idx, tokens=_padded(toks),
                 lengths=long([len(x) for x in toks]), node_word=long(node_word), node_label=long(node_label),
                 parent=long(parent), height=long(height), root=long(root), word_node=_padded(word_nodes, -1),
                 phrase_node=long(ph_node), phrase_caption=long(ph_cap), phrase_tokens=_padded(ph_toks),
                 phrase_lengths=long([len(x) for x in ph_toks]), phrase_span=long(ph_span).view(-1, 2),
                 phrase_text=ph_text, gold=gold)
