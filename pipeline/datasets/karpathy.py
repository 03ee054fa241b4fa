"""Karpathy splits: `dataset_{flickr8k,flickr30k,coco}.json` with images[].filename/split/sentences[].raw."""
from __future__ import annotations

from pathlib import Path

from densevse.pipeline.datasets.base import READERS, inside, make_key, read_json
from densevse.pipeline.errors import DatasetError

SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@READERS.register("karpathy")
def read_karpathy(root: Path, cfg=None):
    files = sorted(root.glob("dataset_*.json"))
    if not files:
        raise DatasetError(f"no dataset_*.json in {root}")
    path = files[0]
    try:
        data = read_json(path)
        images = data["images"]
        name = data.get("dataset", path.stem.removeprefix("dataset_"))
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a Karpathy split file ({e!r})") from None
    for i, img in enumerate(images):
        try:
            split = SPLIT_NAMES[img["split"]]
            caps = [s["raw"] for s in img["sentences"]]
            source = inside(root / "images", path, img.get("filepath", ""), img["filename"])
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{path}: images[{i}] lacks {e}") from None
        yield {"key": make_key(name, img["filename"]), "split": split, "source": str(source),
               "captions": caps, "gold": {}}
