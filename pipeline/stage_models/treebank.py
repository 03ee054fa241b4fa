"""Reading a real PTB-bracket treebank (e.g. GUM) for `densevse parser train --treebank PATH`: pure functions.

A treebank is a directory of bracket files (`*.ptb`, `*.mrg`, `*.tree`, searched recursively) and one of
  - `splits.md`, GUM's format: `## dev` and `## test` sections listing document names (the file stem); every
    other document is train; sections other than dev/test (GUM's `test2`) are left out;
  - or files named after their split (`train.mrg`, `dev.mrg`, `test.mrg`, `*-train.ptb`, ...).

Every tree is normalised the way parsers are trained and scored on the PTB: function tags and indices are
stripped (`NP-SBJ-1` -> `NP`, `NP=2` -> `NP`), empty elements (`-NONE-`) and the constituents left empty by them
are dropped, and the tree is wrapped in `(ROOT ...)` when the file has no ROOT/TOP. A tree that cannot be used
(unbalanced brackets, an empty tree, a bare token, an unknown tag) is skipped and counted under its reason.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from densevse.models.trees import TreeError, parse_brackets

# Penn Treebank POS tags, with the OntoNotes/GUM additions (HYPH, NFP, ADD, AFX, GW, XX).
POS_TAGS = frozenset("""CC CD DT EX FW IN JJ JJR JJS LS MD NN NNS NNP NNPS PDT POS PRP PRP$ RB RBR RBS RP SYM TO UH
    VB VBD VBG VBN VBP VBZ WDT WP WP$ WRB $ # `` '' , . : -LRB- -RRB- -LSB- -RSB- -LCB- -RCB- HYPH NFP ADD AFX GW
    XX""".split())
PHRASE_TAGS = frozenset("""ADJP ADVP CONJP FRAG INTJ LST NAC NP NX PP PRN PRT QP RRC S SBAR SBARQ SINV SQ UCP VP
    WHADJP WHADVP WHNP WHPP X EDITED EMBED META""".split())
ROOT_LABELS = ("ROOT", "TOP", "")
BRACKET_SUFFIXES = (".ptb", ".mrg", ".tree", ".trees")
SPLITS = ("train", "dev", "test")

_TOKEN = re.compile(r"\(|\)|[^\s()]+")


def split_trees(text: str) -> tuple[list[str], list[str]]:
    """Cut a bracket file into top-level tree strings by bracket depth: (trees, rejection reasons).

    A '(' at the start of a line while a tree is still open starts a new tree (PTB files put each tree's
    first bracket in column 0), so one tree missing its ')' costs only itself. A bare token at depth 0 is a
    rejection too."""
    trees, reasons, depth, cur = [], [], 0, []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if depth > 0 and tok == "(" and (m.start() == 0 or text[m.start() - 1] == "\n"):
            reasons.append("unbalanced brackets (missing ')')")
            depth, cur = 0, []
        if depth == 0 and tok != "(":
            reasons.append("bare token outside a tree" if tok != ")" else "unbalanced brackets (extra ')')")
            continue
        cur.append(tok)
        depth += {"(": 1, ")": -1}.get(tok, 0)
        if depth == 0:
            trees.append(" ".join(cur))
            cur = []
    if cur:
        reasons.append("unbalanced brackets (missing ')')")
    return trees, reasons


def base_label(label: str) -> str:
    """`NP-SBJ-1` -> `NP`, `NP=2` -> `NP`; tags that start with '-' (`-LRB-`, `-NONE-`) are kept whole."""
    if label.startswith("-"):
        return label
    return re.split(r"[-=]", label, maxsplit=1)[0] or label


def _clean(node, unknown: set):
    """Normalised node, or None when it held only empty elements. Raises ValueError on a malformed node."""
    label, kids = node
    if label == "-NONE-":
        return None
    label = base_label(label)
    if len(kids) == 1 and isinstance(kids[0], str):  # pre-terminal
        if label not in POS_TAGS:
            unknown.add(label)
        return label, kids
    if not kids:
        raise ValueError("empty constituent")
    if any(isinstance(k, str) for k in kids):
        raise ValueError("bare token next to a constituent")
    out = [c for c in (_clean(k, unknown) for k in kids) if c is not None]
    if not out:
        return None
    if label not in PHRASE_TAGS and label not in ROOT_LABELS:
        unknown.add(label)
    return label, out


def _fmt(node) -> str:
    label, kids = node
    if len(kids) == 1 and isinstance(kids[0], str):
        return f"({label} {kids[0]})"
    return f"({label} " + " ".join(_fmt(k) for k in kids) + ")"


def normalise(tree: str) -> tuple[str | None, str | None]:
    """One tree string -> (`(ROOT ...)` string, None) or (None, reason)."""
    tokens = _TOKEN.findall(tree)
    if len(tokens) < 2 or tokens == ["(", ")"]:
        return None, "empty tree"
    try:
        node = parse_brackets(tree, unwrap=False)
    except TreeError:  # its message quotes the tree; the report counts one reason for all such trees
        return None, "unbalanced brackets"
    try:
        label, kids = node
        if label in ROOT_LABELS:  # (ROOT ...), (TOP ...) and ( ... ) wrappers: one ROOT is added back
            if len(kids) != 1 or isinstance(kids[0], str):
                return None, "root does not hold exactly one constituent"
            node = kids[0]
        unknown: set = set()
        cleaned = _clean(node, unknown)
    except ValueError as e:
        return None, str(e)
    if cleaned is None:
        return None, "empty tree (only empty elements)"
    if unknown:
        return None, f"unknown tag {sorted(unknown)[0]}"
    if len(cleaned[1]) == 1 and isinstance(cleaned[1][0], str):
        return None, "one word and no phrase (a heading): nothing to parse"
    return f"(ROOT {_fmt(cleaned)})", None


def _labels(tree: str) -> set[str]:
    return set(re.findall(r"\((\S+)", tree)) - {"ROOT"}


def split_of(stem: str, named: dict[str, set[str]] | None) -> str | None:
    """The split a document belongs to: from splits.md lists, else from its file name."""
    if named is not None:
        for split in ("dev", "test"):
            if stem in named.get(split, ()):
                return split
        return None if any(stem in v for k, v in named.items() if k not in SPLITS) else "train"
    for split in SPLITS:
        if re.search(rf"(^|[-_.]){split}($|[-_.])", stem):
            return split
    return None


def read_splits_md(text: str) -> dict[str, set[str]]:
    """GUM's splits.md: `## name` headings, then `* DOC` lines."""
    out, cur = {}, None
    for line in text.splitlines():
        if m := re.match(r"^#+\s*(\S+)", line):
            cur = m.group(1).lower()
            out.setdefault(cur, set())
        elif cur and (m := re.match(r"^\s*[*-]\s*(\S+)", line)):
            out[cur].add(m.group(1))
    return out


def read_treebank(root: str | Path) -> tuple[dict[str, list[str]], dict]:
    """(split -> normalised `(ROOT ...)` trees, report) for a treebank dir. Raises FileNotFoundError /
    ValueError (naming the path) when the dir has no bracket files or no train/test trees."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"treebank: no such directory {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix in BRACKET_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"treebank: no bracket files ({', '.join(BRACKET_SUFFIXES)}) under {root}")
    named = read_splits_md((root / "splits.md").read_text()) if (root / "splits.md").is_file() else None
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    rejected: Counter = Counter()
    docs: Counter = Counter()
    for f in files:
        split = split_of(f.stem, named)
        if split is None:
            docs["not in the train/dev/test split"] += 1
            continue
        docs[split] += 1
        trees, reasons = split_trees(f.read_text(encoding="utf-8", errors="replace"))
        rejected.update(reasons)
        for t in trees:
            tree, reason = normalise(t)
            if reason:
                rejected[reason] += 1
            else:
                splits[split].append(tree)
    if not splits["train"] or not splits["test"]:
        raise ValueError(f"treebank {root}: no {'train' if not splits['train'] else 'test'} trees "
                         f"(documents per split {dict(docs)}; name files *train*/*dev*/*test* or add a splits.md)")
    if not splits["dev"]:  # Stanza's trainers need a dev set: the last 10% of train
        n = max(1, len(splits["train"]) // 10)
        splits["dev"], splits["train"] = splits["train"][-n:], splits["train"][:-n]
    # Stanza's parser trainer refuses a dev set with a label the train set lacks: such dev trees are set aside
    known = {lab for t in splits["train"] for lab in _labels(t)}
    dev = []
    for t in splits["dev"]:
        unseen = sorted(_labels(t) - known)
        if unseen:
            rejected[f"dev tree with a label not in train ({unseen[0]})"] += 1
        else:
            dev.append(t)
    splits["dev"] = dev
    return splits, {"trees": {k: len(v) for k, v in splits.items()}, "documents": dict(docs),
                    "rejected": dict(rejected.most_common())}
