"""Real COCO boxes for training the detector: several COCO roots merged into Detectron2 dataset dicts.

Each root holds `annotations/instances_<split>.json` and `images/<split>/<file_name>`. Images are deduplicated
by COCO image id (the first root that lists one wins). The held-out set (`holdout`, "<root dir name>/<split>",
e.g. "coco-det/val2017") is every image that root lists for that split; its ids never reach the training dicts,
even when another root lists them too (coco-mini's val2017 shares 3 ids with coco-det's).

Bad input never crashes and is never dropped silently: each skipped box or image is counted under its reason
in `report` (a Counter). A box partly outside its image is clipped and kept (counted too); crowd boxes are
skipped (they mark a group, not one object); a listed image that is missing, unreadable, of another size than
its entry says, or EXIF-rotated is skipped (COCO boxes are in stored pixels, while Detectron2's reader turns
EXIF-rotated images), as is an image left with no usable box. A file that is not a COCO instances JSON, or an
image path that climbs out of its folder, fails up front naming the file (the dataset readers' `load_json` and
`inside`).
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from densevse.pipeline.datasets.base import inside
from densevse.pipeline.datasets.coco import load_json
from densevse.pipeline.errors import DatasetError

XYXY_ABS = 0  # detectron2.structures.BoxMode.XYXY_ABS (kept numeric so this module needs no Detectron2)

CLIPPED = "box partly outside the image: clipped (kept)"
OUTSIDE = "box outside the image (skipped)"
ZERO_AREA = "box of zero area (skipped)"
CROWD = "crowd box (skipped)"
BAD_BOX = "malformed box entry (skipped)"
UNKNOWN_CATEGORY = "box of a category not listed (skipped)"
NO_IMAGE_ENTRY = "box for an image id not listed (skipped)"
BAD_IMAGE = "malformed image entry (skipped)"
DUPLICATE = "image id already read from an earlier root (skipped)"
HELD_OUT = "held-out image id listed by another root (kept out of training)"
MISSING = "image file missing (skipped)"
UNREADABLE = "image file unreadable (skipped)"
SIZE = "image size differs from its entry (skipped)"
ROTATED = "image has an EXIF rotation (skipped)"
NO_BOXES = "image with no usable box (skipped)"


@dataclass
class CocoBoxes:
    train: list[dict] = field(default_factory=list)    # Detectron2 dataset dicts, sorted by image id
    holdout: list[dict] = field(default_factory=list)  # same format, the held-out images
    report: Counter = field(default_factory=Counter)   # reason -> count
    categories: list[int] = field(default_factory=list)  # COCO category ids, sorted (class index = position)


def instance_files(root: Path) -> list[Path]:
    return sorted((Path(root) / "annotations").glob("instances_*.json"))


def fingerprint(roots) -> str:
    """sha256 over each root's annotation files' bytes and its image files (relative names and sizes): the
    part of the detector's cache key that the data makes, independent of how the roots are spelled."""
    h = hashlib.sha256()
    for root in map(Path, roots):
        h.update(root.name.encode())
        for f in instance_files(root):
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
        for f in sorted((root / "images").rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _box(a: dict, w: int, h: int, report: Counter) -> list[float] | None:
    """The annotation's [x, y, w, h] as clipped XYXY, or None (counted) when it is no usable object box."""
    b = a.get("bbox")
    if not isinstance(b, (list, tuple)) or len(b) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b):
        report[BAD_BOX] += 1
        return None
    if a.get("iscrowd", 0):
        report[CROWD] += 1
        return None
    x0, y0, x1, y1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    if b[2] <= 0 or b[3] <= 0:
        report[ZERO_AREA] += 1
        return None
    c = [min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)]
    if c[2] - c[0] < 1 or c[3] - c[1] < 1:  # nothing (under a pixel) left inside the image
        report[OUTSIDE] += 1
        return None
    if c != [x0, y0, x1, y1]:
        report[CLIPPED] += 1
    return [float(v) for v in c]


def _image_problem(path: Path, w: int, h: int) -> str | None:
    """Why this listed image cannot be trained on, or None. Reads the header only."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return MISSING
    try:
        with Image.open(path) as im:
            size, orientation = im.size, im.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError):
        return UNREADABLE
    if size != (w, h):
        return SIZE
    return ROTATED if orientation not in (1, None) else None


def _split_of(f: Path) -> str:
    return f.stem.removeprefix("instances_")


def read_coco_boxes(roots, holdout: str = "coco-det/val2017", classes: str = "object") -> CocoBoxes:
    """Merge the roots' instances files into training and held-out dicts. `classes`: "object" (one class,
    category_id 0: class-agnostic proposals) or "coco" (one class per COCO category id, in sorted order)."""
    hold_root, _, hold_split = holdout.partition("/")
    out = CocoBoxes()
    files = [(Path(r), f) for r in roots for f in instance_files(Path(r))]
    if empty := [str(r) for r in roots if not instance_files(Path(r))]:
        raise DatasetError(f"no annotations/instances_*.json under {', '.join(empty)}")
    data = {f: load_json(f) for _, f in files}
    cats = sorted({c["id"] for d in data.values() for c in d.get("categories", []) if isinstance(c, dict)
                   and isinstance(c.get("id"), int)})
    out.categories = cats
    index = {c: i for i, c in enumerate(cats)}
    held_ids = {im.get("id") for (root, f) in files if root.name == hold_root and _split_of(f) == hold_split
                for im in data[f]["images"] if isinstance(im, dict)}
    seen: set[int] = set()
    for root, f in files:
        split, d = _split_of(f), data[f]
        is_holdout = root.name == hold_root and split == hold_split
        anns: dict[int, list[dict]] = {}
        for a in d["annotations"]:
            if isinstance(a, dict) and isinstance(a.get("image_id"), int):
                anns.setdefault(a["image_id"], []).append(a)
            else:
                out.report[BAD_BOX] += 1
        images = {}
        for im in d["images"]:
            ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str) \
                and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height"))
            if not ok:
                out.report[BAD_IMAGE] += 1
            elif im["id"] in images:
                out.report[DUPLICATE] += 1
            else:
                images[im["id"]] = im
        if orphans := sum(len(v) for k, v in anns.items() if k not in images):
            out.report[NO_IMAGE_ENTRY] += orphans
        for iid in sorted(images):
            im = images[iid]
            if not is_holdout:
                if iid in held_ids:
                    out.report[HELD_OUT] += 1
                    continue
                if iid in seen:
                    out.report[DUPLICATE] += 1
                    continue
            w, h = im["width"], im["height"]
            path = inside(root / "images" / split, f, im["file_name"])  # a hostile name stops here, as in the readers
            problem = _image_problem(path, w, h)
            if problem:
                out.report[problem] += 1
                continue
            boxes = [(b, a) for a in anns.get(iid, []) if (b := _box(a, w, h, out.report)) is not None]
            if classes == "coco" and (unknown := sum(a.get("category_id") not in index for _, a in boxes)):
                out.report[UNKNOWN_CATEGORY] += unknown  # no class to train it as
                boxes = [(b, a) for b, a in boxes if a.get("category_id") in index]
            if not boxes:
                out.report[NO_BOXES] += 1
                continue
            seen.add(iid)
            (out.holdout if is_holdout else out.train).append({
                "file_name": str(path), "image_id": iid, "height": h, "width": w,
                "annotations": [{"bbox": b, "bbox_mode": XYXY_ABS,
                                 "category_id": index[a["category_id"]] if classes == "coco" else 0}
                                for b, a in boxes]})
    out.train.sort(key=lambda r: r["image_id"])
    out.holdout.sort(key=lambda r: r["image_id"])
    return out
