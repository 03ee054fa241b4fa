"""The project's constituency-tree format, shared by the parse stage and the tree-LSTM.

A tree is a JSON object::

    {"tokens":  ["a", "red", "circle", ...],          # n words
     "labels":  ["DT", "JJ", "NN", ..., "NP", "S"],    # one per node
     "spans":   [[0, 1], [1, 2], ..., [0, 3], [0, n]], # token span [start, end) per node
     "parents": [5, 5, 5, ..., 6, -1]}                 # parent node index, -1 for the root

Nodes are in topological order: nodes 0..n-1 are the words (label = POS tag; the PTB pre-terminal is
folded into its word), then the phrase nodes in post-order, so every child comes before its parent and
the root is last. A model can therefore sweep the list once, bottom-up, without recursion.
"""
from __future__ import annotations

import re
from collections import Counter

PHRASE_LABELS = frozenset({"NP", "VP", "PP", "ADJP", "ADVP", "S", "SBAR", "QP", "NX", "PRN", "UCP", "WHNP", "SQ"})

_TOKEN_RE = re.compile(r"\(|\)|[^\s()]+")


class TreeError(ValueError):
    """A bracket string or tree dict that is not a well-formed constituency tree."""


def parse_brackets(s: str, unwrap: bool = True):
    """Nested (label, children) tuples of a bracket string; children are tuples or words. `unwrap` removes
    single-child ( ... ) / (ROOT ...) / (TOP ...) wrappers. Raises TreeError."""
    toks = _TOKEN_RE.findall(s)
    if not toks:
        raise TreeError("empty tree string")
    pos = 0

    def node():
        nonlocal pos
        if toks[pos] != "(":
            raise TreeError(f"expected '(' at token {pos} in {s!r}")
        pos += 1
        if pos >= len(toks):
            raise TreeError(f"unexpected end of {s!r}")
        label = toks[pos] if toks[pos] not in "()" else ""
        if label:
            pos += 1
        children = []
        while pos < len(toks) and toks[pos] != ")":
            if toks[pos] == "(":
                children.append(node())
            else:
                children.append(toks[pos])
                pos += 1
        if pos >= len(toks):
            raise TreeError(f"unbalanced brackets in {s!r}")
        pos += 1
        return (label, children)

    root = node()
    if pos != len(toks):
        raise TreeError(f"trailing text after tree in {s!r}")
    # PTB files often wrap the tree in an unlabeled ( ... ) or (ROOT ...): unwrap single-child wrappers.
    while unwrap and root[0] in ("", "ROOT", "TOP") and len(root[1]) == 1 and isinstance(root[1][0], tuple):
        root = root[1][0]
    return root


def from_ptb(s: str) -> dict:
    """Parse a PTB bracket string into the tree format above."""
    root = parse_brackets(s)
    tokens: list[str] = []
    labels: list[str] = []
    internal: list[tuple[str, int, int, list[int]]] = []  # label, start, end, child refs

    # First pass: collect words (pre-terminals) in order; refs are ("w", i) or ("n", j).
    def walk(n):
        label, children = n
        if len(children) == 1 and isinstance(children[0], str):  # pre-terminal
            tokens.append(children[0])
            labels.append(label)
            return ("w", len(tokens) - 1), len(tokens) - 1, len(tokens)
        if not children:
            raise TreeError(f"node {label!r} has no children")
        refs, start, end = [], None, None
        for c in children:
            if isinstance(c, str):
                raise TreeError(f"bare word {c!r} next to a phrase in node {label!r}")
            r, s0, e0 = walk(c)
            refs.append(r)
            start = s0 if start is None else start
            end = e0
        internal.append((label, start, end, refs))
        return ("n", len(internal) - 1), start, end

    walk(root)
    n = len(tokens)
    parents = [-1] * (n + len(internal))
    spans = [[i, i + 1] for i in range(n)]
    for j, (label, start, end, refs) in enumerate(internal):
        labels.append(label)
        spans.append([start, end])
        for kind, idx in refs:
            parents[idx if kind == "w" else n + idx] = n + j
    return {"tokens": tokens, "labels": labels, "spans": spans, "parents": parents}


def validate(tree: dict) -> None:
    """Raise TreeError unless `tree` is a well-formed tree in topological order."""
    try:
        tokens, labels, spans, parents = tree["tokens"], tree["labels"], tree["spans"], tree["parents"]
    except (KeyError, TypeError) as e:
        raise TreeError(f"tree is missing field {e}") from None
    n, m = len(tokens), len(labels)
    if n == 0:
        raise TreeError("tree has no tokens")
    if not (len(spans) == len(parents) == m) or m < n:
        raise TreeError("labels, spans and parents must have one entry per node")
    if parents[-1] != -1 or any(p == -1 for p in parents[:-1]):
        raise TreeError("exactly the last node must be the root")
    for i, p in enumerate(parents[:-1]):
        if not (max(i, n - 1) < p < m):
            raise TreeError(f"node {i} has parent {p}: parents must come after children and be phrase nodes")
    if spans[-1] != [0, n]:
        raise TreeError(f"root span {spans[-1]} does not cover the {n} tokens")


def children(tree: dict) -> list[list[int]]:
    """Child node indices of every node, left to right."""
    kids: list[list[int]] = [[] for _ in tree["labels"]]
    for i, p in enumerate(tree["parents"]):
        if p >= 0:
            kids[p].append(i)
    for k in kids:
        k.sort(key=lambda c: tree["spans"][c][0])
    return kids


def to_ptb(tree: dict) -> str:
    """Inverse of from_ptb."""
    kids = children(tree)
    n = len(tree["tokens"])

    def fmt(i: int) -> str:
        if i < n:
            return f"({tree['labels'][i]} {tree['tokens'][i]})"
        return f"({tree['labels'][i]} " + " ".join(fmt(c) for c in kids[i]) + ")"

    return fmt(len(tree["labels"]) - 1)


def heights(tree: dict) -> list[int]:
    """Height of every node (words 0). Nodes of equal height can be computed together."""
    h = [0] * len(tree["labels"])
    for i, p in enumerate(tree["parents"]):
        if p >= 0:
            h[p] = max(h[p], h[i] + 1)
    return h


def phrases(tree: dict, labels: frozenset[str] = PHRASE_LABELS) -> list[dict]:
    """Phrase nodes (inner nodes with a phrase label, root excluded) with their token spans."""
    n = len(tree["tokens"])
    out = []
    for i in range(n, len(tree["labels"]) - 1):
        if tree["labels"][i] in labels:
            s, e = tree["spans"][i]
            out.append({"node": i, "label": tree["labels"][i], "start": s, "end": e,
                        "text": " ".join(tree["tokens"][s:e])})
    return out


TEXT_TREES = ("parse", "left_branching", "right_branching")
BRANCH_LABEL = "XP"  # the inner nodes of a branching tree: no phrase type, every one is a phrase


def restructure(tree: dict, kind: str = "parse") -> dict:
    """The same words and POS tags under another tree, for the ablation "does the parse help?" (train.text_tree).

    parse: the tree itself. left_branching: ((w0 w1) w2) ...: the tree-LSTM then reads the words left to right,
    a sequential (flat) encoder; its phrases are the prefixes. right_branching: w0 (w1 (w2 ...)): the suffixes.
    Inner nodes are labelled BRANCH_LABEL; one-word captions keep a root over their word."""
    if kind == "parse":
        return tree
    if kind not in TEXT_TREES:
        raise TreeError(f"unknown text tree {kind!r}; known: {TEXT_TREES}")
    n = len(tree["tokens"])
    labels, spans, parents = list(tree["labels"][:n]), [[i, i + 1] for i in range(n)], [-1] * n
    left = kind == "left_branching"
    order = range(1, n) if left else range(n - 2, -1, -1)  # the word each new inner node adds
    prev = 0 if left else n - 1                             # the subtree it adds it to
    for w in (order if n > 1 else [0]):
        node = len(labels)
        span = [0, w + 1] if left else [w, n]
        for child in ({prev, w} if n > 1 else {w}):
            parents[child] = node
        labels.append(BRANCH_LABEL)
        spans.append(span)
        parents.append(-1)
        prev = node
    return {"tokens": list(tree["tokens"]), "labels": labels, "spans": spans, "parents": parents}


def brackets(tree: dict) -> set[tuple[str, int, int]]:
    """Labelled spans of the phrase nodes (evalb-style, pre-terminals excluded), for bracket F1."""
    n = len(tree["tokens"])
    return {(tree["labels"][i], *tree["spans"][i]) for i in range(n, len(tree["labels"]))}


PUNCT_TAGS = frozenset({",", ":", "``", "''", ".", "-LRB-", "-RRB-", "HYPH", "NFP"})  # evalb drops punctuation


def evalb_brackets(tree: dict, punct: frozenset[str] = PUNCT_TAGS) -> Counter:
    """Labelled brackets as evalb's COLLINS.prm counts them: punctuation words deleted (spans counted over the
    remaining words), brackets left empty dropped, ADVP = PRT, duplicates (unary chains) counted."""
    n = len(tree["tokens"])
    keep = [tree["labels"][i] not in punct for i in range(n)]
    before = [0]
    for k in keep:
        before.append(before[-1] + k)
    out: Counter = Counter()
    for i in range(n, len(tree["labels"])):
        s, e = tree["spans"][i]
        if before[e] > before[s]:
            label = "ADVP" if tree["labels"][i] == "PRT" else tree["labels"][i]
            out[(label, before[s], before[e])] += 1
    return out


def evalb(gold: list[dict], pred: list[dict]) -> dict:
    """Corpus-level labelled precision / recall / F1, evalb-style (see evalb_brackets); the words must match."""
    match = n_gold = n_pred = 0
    for g, p in zip(gold, pred, strict=True):
        gb, pb = evalb_brackets(g), evalb_brackets(p)
        match += sum((gb & pb).values())
        n_gold += sum(gb.values())
        n_pred += sum(pb.values())
    prec, rec = match / max(1, n_pred), match / max(1, n_gold)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if match else 0.0}


def bracket_f1(gold: list[dict], pred: list[dict]) -> float:
    """Corpus-level labelled bracket F1 (the evalb measure, without its punctuation rules)."""
    match = n_gold = n_pred = 0
    for g, p in zip(gold, pred, strict=True):
        gb, pb = brackets(g), brackets(p)
        match += len(gb & pb)
        n_gold += len(gb)
        n_pred += len(pb)
    if match == 0:
        return 0.0
    prec, rec = match / n_pred, match / n_gold
    return 2 * prec * rec / (prec + rec)
