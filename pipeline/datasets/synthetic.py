"""The embedded default dataset: seeded scenes of coloured shapes, captions from a small grammar, gold trees.

Captions are built so that structure matters: "a red circle above a blue square" and "a blue circle above a
red square" use the same words, and a scene's distractors often hold the swapped pair, so a bag-of-words model
cannot tell them apart while a model that composes (colour, shape) inside each noun phrase and reads the
relation can. Every caption comes with its gold PTB tree and gold links (object noun phrase -> box).

Everything is a pure function of (seed, index), so any image can be regenerated alone and in parallel.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from densevse.models import trees

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 215, 40), "purple": (150, 60, 190), "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.07, "large": 0.12}  # half-size as a fraction of the image side


# ---------------------------------------------------------------- scenes

def sample_scene(rng: np.random.Generator, n_objects: int, size: int) -> list[dict]:
    """Objects with distinct (colour, shape), non-overlapping boxes. Box = [x0, y0, x1, y1] in pixels."""
    objs: list[dict] = []
    pairs = set()
    tries = 0
    while len(objs) < n_objects and tries < 500:
        tries += 1
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        if (color, shape) in pairs:
            continue
        sz = str(rng.choice(list(SIZES)))
        r = SIZES[sz] * size
        cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
        box = [cx - r, cy - r, cx + r, cy + r]
        if any(_overlap(box, o["box"], pad=4) for o in objs):
            continue
        pairs.add((color, shape))
        objs.append({"color": color, "shape": shape, "size": sz, "box": [round(float(v), 1) for v in box]})
    return objs


def _overlap(a, b, pad=0.0) -> bool:
    return not (a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1] or b[3] + pad <= a[1])


def render(objs: list[dict], size: int, rng: np.random.Generator) -> Image.Image:
    bg = int(rng.integers(70, 130))
    noise = rng.integers(-12, 13, size=(size, size, 1))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8).repeat(3, axis=2))
    draw = ImageDraw.Draw(img)
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse(o["box"], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        else:  # star
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else 0.45 * r
                a = -np.pi / 2 + k * np.pi / 5
                pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
            draw.polygon(pts, fill=fill)
    return img


# ---------------------------------------------------------------- captions (grammar -> PTB tree)
# A tree is built as nested tuples (label, children...) with words as (POS, word); `_np` marks object NPs.

def _np(o: dict, with_size: bool, det: str = "a"):
    words = [("DT", det)] + ([("JJ", o["size"])] if with_size else []) + [("JJ", o["color"]), ("NN", o["shape"])]
    return ("NP", *words)


def relation(a: dict, b: dict) -> str:
    """Where a is relative to b, by the larger displacement of the box centres (image y grows downwards)."""
    ax, ay = (a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2
    bx, by = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _rel_phrase(rel: str, np_b):
    if rel in ("above", "below"):
        return ("PP", ("IN", rel), np_b)
    head, _ = rel.split()
    return ("ADVP", ("RB", head), ("PP", ("IN", "of"), np_b))


def sample_caption(rng: np.random.Generator, objs: list[dict]) -> tuple[str, list[int]]:
    """One caption as a PTB string, plus the object index of each object NP in left-to-right order."""
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    sa, sb = bool(rng.random() < 0.35), bool(rng.random() < 0.35)
    rel = relation(a, b)
    npa, npb = _np(a, sa), _np(b, sb)
    t = int(rng.integers(0, 5))
    if t == 0:    # a red circle left of a blue square
        tree, order = ("NP", npa, _rel_phrase(rel, npb)), [i, j]
    elif t == 1:  # a red circle is above a blue square
        tree, order = ("S", npa, ("VP", ("VBZ", "is"), _rel_phrase(rel, npb))), [i, j]
    elif t == 2:  # there is a red circle below a blue square
        tree = ("S", ("NP", ("EX", "there")), ("VP", ("VBZ", "is"), ("NP", npa, _rel_phrase(rel, npb))))
        order = [i, j]
    elif t == 3:  # the blue square is right of the red circle (the relation read from the other side)
        inv = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        tree = ("S", _np(b, sb, "the"), ("VP", ("VBZ", "is"), _rel_phrase(inv, _np(a, sa, "the"))))
        order = [j, i]
    else:         # a red circle and a blue square
        tree, order = ("NP", npa, ("CC", "and"), npb), [i, j]
    return _to_ptb(tree), order


def _to_ptb(t) -> str:
    label, *kids = t
    if len(kids) == 1 and isinstance(kids[0], str):
        return f"({label} {kids[0]})"
    return f"({label} " + " ".join(_to_ptb(k) for k in kids) + ")"


def object_links(tree: dict, order: list[int]) -> list[list[int]]:
    """Gold phrase->box links as [start, end, box]: the k-th object NP (an NP ending in a shape word)
    spans tokens [start, end) and shows object order[k]. Token spans, not node ids, so any parser's
    phrases can be scored against them."""
    n = len(tree["tokens"])
    spans = sorted(tree["spans"][i] for i in range(n, len(tree["labels"]))
                   if tree["labels"][i] == "NP" and tree["tokens"][tree["spans"][i][1] - 1] in SHAPES
                   and tree["spans"][i][1] - tree["spans"][i][0] <= 4)
    if len(spans) != len(order):
        raise AssertionError(f"grammar produced {len(spans)} object NPs for {len(order)} objects")
    return [[s, e, obj] for (s, e), obj in zip(spans, order)]


def make_image(seed: int, index: int, size: int = 224, min_objects: int = 2, max_objects: int = 4,
               n_captions: int = 5) -> tuple[Image.Image, dict]:
    """Image `index` of the set `seed`: (picture, annotation with captions, PTB trees, boxes, links)."""
    rng = np.random.default_rng([seed, index])
    objs = sample_scene(rng, int(rng.integers(min_objects, max_objects + 1)), size)
    img = render(objs, size, rng)
    caps, ptbs, links, seen = [], [], {}, set()
    for _ in range(50):
        if len(caps) == n_captions:
            break
        ptb, order = sample_caption(rng, objs)
        tree = trees.from_ptb(ptb)
        text = " ".join(tree["tokens"])
        if text in seen:
            continue
        seen.add(text)
        links[str(len(caps))] = object_links(tree, order)
        caps.append(text)
        ptbs.append(ptb)
    n_distinct = len(caps)
    while len(caps) < n_captions:  # a tiny scene can run out of distinct captions: repeat, never fewer
        k = len(caps) % n_distinct
        links[str(len(caps))] = links[str(k)]
        caps.append(caps[k])
        ptbs.append(ptbs[k])
    ann = {"captions": caps, "trees": ptbs, "links": links,
           "boxes": [o["box"] for o in objs],
           "labels": [f"{o['size']} {o['color']} {o['shape']}" for o in objs]}
    return img, ann


def treebank(n: int, seed: int = 1234) -> list[str]:
    """n gold PTB trees of synthetic captions (scenes sampled, not rendered): the parser's training data."""
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, k, 7])
        objs = sample_scene(rng, int(rng.integers(2, 5)), 224)
        out.append(sample_caption(rng, objs)[0])
    return out


# ---------------------------------------------------------------- writing the dataset to disk

def split_of(index: int, num_images: int, test_images: int, val_fraction: float) -> str:
    """The last `test_images` images are the test split, a fraction before them val, the rest train."""
    n_val = int(round(val_fraction * (num_images - test_images)))
    if index >= num_images - test_images:
        return "test"
    if index >= num_images - test_images - n_val:
        return "val"
    return "train"


def generate(root: Path, cfg) -> Path:
    """Write the set described by SyntheticConfig `cfg` under root (images/*.jpg + annotations.json).

    Idempotent: a finished set with the same config is left as it is; annotations.json is written last,
    atomically, so a half-written set is regenerated.
    """
    root = Path(root)
    ann_path = root / "annotations.json"
    spec = cfg.model_dump(mode="json")
    if ann_path.exists():
        try:
            if json.loads(ann_path.read_text()).get("config") == spec:
                return ann_path
        except json.JSONDecodeError:
            pass
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for idx in range(cfg.num_images):
        img, ann = make_image(cfg.seed, idx, cfg.image_size, cfg.min_objects, cfg.max_objects,
                              cfg.captions_per_image)
        key = f"synth_{idx:06d}"
        img.save(root / "images" / f"{key}.jpg", quality=92)
        records.append({"key": key, "file": f"images/{key}.jpg",
                        "split": split_of(idx, cfg.num_images, cfg.test_images, cfg.val_fraction), **ann})
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"config": spec, "images": records}))
    tmp.replace(ann_path)
    return ann_path
