"""Flickr8k: `Flickr8k.token.txt` (`<image>#<n>\t<caption>`) and the official split lists.

The official caption file has quirks, handled as documented rules or recorded rejections, never a crash or a
silent drop: 3 lines separate the id from the caption with a space instead of a tab (the id ends at the first
whitespace: they parse), and 5 lines are under `2258277193_586949ec62.jpg.1`, an id that names no image (not
an image file name, in no split list): they become one sample rejected with that reason, in the split
`unlisted`, so `densevse inspect --rejects` shows them. Photos in no split list (91 in the official release)
are not read: the official protocol leaves them out.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from densevse.pipeline.datasets.base import READERS, inside, linked_dir, make_key, read_text
from densevse.pipeline.errors import DatasetError

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
UNLISTED = "unlisted"  # the split of samples rejected by the reader itself (they belong to no official split)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_LINE = re.compile(r"(\S+)#(\d+)\s(.*)")  # id#n, then a tab (or, in 3 official lines, a space), then the caption
log = logging.getLogger("densevse.datasets")


def parse_token_file(path: Path) -> dict[str, list[str]]:
    """image name -> captions in caption-number order."""
    caps: dict[str, dict[int, str]] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line)
        if not m:
            raise DatasetError(f"{path}:{lineno}: expected '<image>#<n>\\t<caption>', got {line[:80]!r}")
        name, num, caption = m.groups()
        caps.setdefault(name, {})[int(num)] = caption
    return {name: [c[k] for k in sorted(c)] for name, c in caps.items()}


@READERS.register("flickr8k")
def read_flickr8k(root: Path, cfg=None):
    captions = parse_token_file(root / "Flickr8k.token.txt")
    images = linked_dir(root / "images")
    listed: set[str] = set()
    for split, fname in SPLIT_FILES.items():
        path = root / fname
        if not path.exists():
            continue
        for name in read_text(path).split():
            if name not in captions:
                raise DatasetError(f"{path}: image {name} has no captions in Flickr8k.token.txt")
            listed.add(name)
            yield {"key": make_key("flickr8k", name), "split": split,
                   "source": str(inside(images, path, name)), "captions": captions[name], "gold": {}}
    unlisted = sorted(set(captions) - listed)
    for name in unlisted:
        if not name.lower().endswith(IMAGE_SUFFIXES):
            yield {"key": make_key("flickr8k", name.replace(".", "_")), "split": UNLISTED, "source": "",
                   "captions": captions[name], "gold": {},
                   "reject": f"dataset: caption id {name!r} names no image ({len(captions[name])} captions in "
                             f"Flickr8k.token.txt; not an image file name, in no split list)"}
    n_photos = sum(n.lower().endswith(IMAGE_SUFFIXES) for n in unlisted)
    if n_photos:
        log.info("flickr8k: %d photos with captions are in no split list: not read (the official protocol)",
                 n_photos)
