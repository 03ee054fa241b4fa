"""Tiny shard sets in the preprocessing pipeline's exact output format, for tests and quick benches that
must not wait for (or depend on) the real preprocessing run.

    write_fixture_shards(tmp_path / "shards", n_train=40, n_val=10, n_test=10, feat_dim=32)

Images are scenes of 2-3 coloured shapes; region features are (colour vector + shape vector + noise), the
whole-image row the sum of its regions; captions are gold PTB trees from a small grammar, with gold links
(object NP node -> box). So a model can learn from it, and binding (which colour goes with which shape)
matters. `random_tree` makes arbitrary well-formed trees for tree-LSTM tests.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from densevse.models import trees
from densevse.pipeline import shardset, storage
from densevse.stages.base import empty_row, npy_bytes

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle", "star")


def random_tree(rng: random.Random, n_words: int, vocab=("a", "red", "circle", "left", "of", "blue", "x")) -> dict:
    """A random constituency tree over n_words words (random nesting and arity), in the project's format."""
    items = [f"(NN {rng.choice(vocab)})" for _ in range(n_words)]
    while len(items) > 1:
        i = rng.randrange(len(items))
        k = rng.randint(1, min(3, len(items) - i))
        items[i:i + k] = [f"({rng.choice(['NP', 'VP', 'PP'])} " + " ".join(items[i:i + k]) + ")"]
    t = items[0] if items[0].startswith("(S") else f"(S {items[0]})"
    return trees.from_ptb(t)


def _np(o):
    return f"(NP (DT a) (JJ {o[0]}) (NN {o[1]}))"


def _caption(rng: random.Random, objs: list[tuple[str, str]], k: int) -> tuple[str, list[int]]:
    i, j = rng.sample(range(len(objs)), 2)
    rel = "left" if objs[i][2] < objs[j][2] else "right"
    kind = k % 3
    if kind == 0:
        ptb = f"(S {_np(objs[i])} (VP (VBZ is) (ADVP (RB {rel}) (PP (IN of) {_np(objs[j])}))))"
    elif kind == 1:
        ptb = f"(NP {_np(objs[i])} (CC and) {_np(objs[j])})"
    else:
        ptb = f"(NP {_np(objs[i])} (ADVP (RB {rel}) (PP (IN of) {_np(objs[j])})))"
    return ptb, [i, j]


def _object_nodes(tree: dict) -> list[int]:
    """Object NP nodes (NP directly over DT JJ NN), left to right."""
    n = len(tree["tokens"])
    return sorted((i for i in range(n, len(tree["labels"]))
                   if tree["labels"][i] == "NP" and tree["spans"][i][1] - tree["spans"][i][0] == 3
                   and tree["tokens"][tree["spans"][i][1] - 1] in SHAPES), key=lambda i: tree["spans"][i][0])


def make_row(index: int, split: str, shard: str, feat_dim: int, size: int, seed: int, codes: dict,
             whole_image_only: bool = False) -> dict:
    rng = random.Random(seed * 7919 + index)
    objs = []
    for c, s in rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(2, 3)):
        objs.append((c, s, rng.uniform(0.1, 0.9) * size))
    img = Image.new("RGB", (size, size), (100, 100, 100))
    draw = ImageDraw.Draw(img)
    boxes = [[0, 0, size, size]]
    for c, s, x in objs:
        r = size * 0.08
        y = rng.uniform(r, size - r)
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if s == "circle" else draw.rectangle)(box, fill=COLORS[c])
        boxes.append(box)
    nrng = np.random.default_rng(seed * 7919 + index)
    reg = np.stack([codes[c] + codes[s] + 0.3 * nrng.normal(size=feat_dim) for c, s, _ in objs])
    feats = np.concatenate([reg.sum(0, keepdims=True), reg]).astype(np.float16)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    caps, links = [], {}
    for k in range(5):
        ptb, order = _caption(rng, objs, k)
        tree = trees.from_ptb(ptb)
        caps.append({"index": k, "text": " ".join(tree["tokens"]), "tree": tree, "phrases": trees.phrases(tree)})
        links[str(k)] = [[node, 1 + order[m]] for m, node in enumerate(_object_nodes(tree))]
    # gold boxes are the regions (rows 1..) in image order
    gold = {"boxes": boxes[1:], "labels": [f"{c} {s}" for c, s, _ in objs],
            "links": {k: [[nd, b - 1] for nd, b in v] for k, v in links.items()}}
    if whole_image_only:
        boxes, feats, gold = boxes[:1], feats[:1], {}
    return empty_row(key=f"fx{index:06d}", split=split, shard=shard, source=f"fixture://{index}",
                     image=buf.getvalue(), width=size, height=size, captions=json.dumps(caps),
                     gold=json.dumps(gold), boxes=npy_bytes(np.asarray(boxes, np.float32)), feats=npy_bytes(feats))


def write_fixture_shards(shard_dir: Path, n_train: int = 40, n_val: int = 10, n_test: int = 10,
                         feat_dim: int = 32, per_shard: int = 10, size: int = 64, seed: int = 0,
                         whole_image_only: bool = False) -> Path:
    """Writes {split}-{i:06d}.tar + .stats.json + manifest.parquet; returns shard_dir. whole_image_only: one
    region per image and no gold (as Flickr8k without a detector)."""
    shard_dir = storage.location(shard_dir)  # a local path or an s3:// URI (tests/test_s3.py)
    crng = np.random.default_rng(seed + 1)
    codes = {w: crng.normal(size=feat_dim) for w in (*COLORS, *SHAPES)}
    names, index = [], 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for si, start in enumerate(range(0, n, per_shard)):
            name = shardset.shard_name(split, si)
            rows = [make_row(index + i, split, name, feat_dim, size, seed, codes, whole_image_only)
                    for i in range(min(per_shard, n - start))]
            index += len(rows)
            shardset.write_shard(rows, shard_dir, name)
            names.append(name)
    shardset.write_manifest(shard_dir, names)
    return shard_dir


def planned_rows(plan_dir, infos: list[dict]) -> list[dict]:
    """Every planned sample's row, in plan order, from a written plan and its infos (write_plan's, plan's): as
    the workers build them (read_shard + shard_rows)."""
    from densevse.pipeline.preprocess.plan import read_shard, shard_rows

    return [r for i in infos for r in shard_rows(read_shard(plan_dir / i["file"], i["row_group"]))]
