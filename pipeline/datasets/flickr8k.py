"""Flickr8k: `Flickr8k.token.txt` (`<image>#<n>\t<caption>`) and the official split lists."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import READERS, inside, make_key, read_text
from pipeline.errors import DatasetError

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}


def parse_token_file(path: Path) -> dict[str, list[str]]:
    """image name -> captions in caption-number order."""
    caps: dict[str, dict[int, str]] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        head, sep, caption = line.partition("\t")
        name, hash_, num = head.rpartition("#")[0], "#" in head, head.rpartition("#")[2]
        if not sep or not hash_ or not num.isdigit():
            raise DatasetError(f"{path}:{lineno}: expected '<image>#<n>\\t<caption>', got {line[:80]!r}")
        caps.setdefault(name, {})[int(num)] = caption
    return {name: [c[k] for k in sorted(c)] for name, c in caps.items()}


@READERS.register("flickr8k")
def read_flickr8k(root: Path, cfg=None):
    captions = parse_token_file(root / "Flickr8k.token.txt")
    for split, fname in SPLIT_FILES.items():
        path = root / fname
        if not path.exists():
            continue
        for name in read_text(path).split():
            if name not in captions:
                raise DatasetError(f"{path}: image {name} has no captions in Flickr8k.token.txt")
            yield {"key": make_key("flickr8k", name), "split": split,
                   "source": str(inside(root / "images", path, name)), "captions": captions[name], "gold": {}}
