"""MS-COCO: `annotations/captions_{split}2017.json` (+ `instances_{split}2017.json` for gold boxes).

COCO boxes are in the stored pixels of each JPEG (the annotators' tool ignored EXIF orientation), so with an
instances file every image's gold has "boxes" (maybe empty) and ingest keeps its pixels as stored, unturned:
one rule for the whole split. Without one, gold is {} and ingest applies the EXIF orientation.
"""
from __future__ import annotations

from pathlib import Path

from densevse.pipeline.datasets.base import READERS, inside, make_key, read_json
from densevse.pipeline.errors import DatasetError

SPLITS = {"train": "train2017", "val": "val2017"}


def load_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: a COCO file needs 'images' and 'annotations'")
    return data


@READERS.register("coco")
def read_coco(root: Path, cfg=None):
    for split, coco_split in SPLITS.items():
        cap_path = root / "annotations" / f"captions_{coco_split}.json"
        if not cap_path.exists():
            continue
        caps = load_json(cap_path)
        by_image: dict[int, list[str]] = {}
        for a in caps["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a["caption"])
        boxes: dict[int, list] | None = None
        inst_path = root / "annotations" / f"instances_{coco_split}.json"
        if inst_path.exists():
            boxes = {}
            inst = load_json(inst_path)
            names = {c["id"]: c["name"] for c in inst.get("categories", [])}
            for a in inst["annotations"]:
                x, y, w, h = a["bbox"]
                boxes.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], names.get(a["category_id"], "?")))
        for img in sorted(caps["images"], key=lambda i: i["id"]):
            gold = {}
            if boxes is not None:
                mine = boxes.get(img["id"], [])
                gold = {"boxes": [b for b, _ in mine], "labels": [n for _, n in mine]}
            yield {"key": make_key("coco", img["file_name"]), "split": split,
                   "source": str(inside(root / "images" / coco_split, cap_path, img["file_name"])),
                   "captions": by_image.get(img["id"], []), "gold": gold}
