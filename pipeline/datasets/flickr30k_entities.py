"""Flickr30k Entities: `Sentences/<id>.txt` phrase markup and `Annotations/<id>.xml` boxes.

Sentence markup: `[/EN#18/people A man] with [/EN#19/clothing pierced ears] ...`; each bracket is a phrase
linked to entity 18. Annotations hold PASCAL-VOC objects whose <name> lists the entity ids they show. Phrases
become gold links (token span -> box); entities without a box (<nobndbox>) are skipped.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from densevse.pipeline.datasets.base import READERS, inside, make_key, read_text, require
from densevse.pipeline.errors import DatasetError

_PHRASE = re.compile(r"\[/EN#(\d+)/(\S+) ([^\]]*)\]")


def parse_sentence(line: str) -> tuple[str, list[tuple[int, int, int]]]:
    """Plain caption and its phrases as (token start, token end, entity id)."""
    tokens: list[str] = []
    phrases = []
    pos = 0
    for m in _PHRASE.finditer(line):
        tokens += line[pos:m.start()].split()
        words = m.group(3).split()
        phrases.append((len(tokens), len(tokens) + len(words), int(m.group(1))))
        tokens += words
        pos = m.end()
    rest = line[pos:]
    if "[" in rest or "]" in rest:
        raise ValueError(f"unbalanced phrase markup near {rest[:40]!r}")
    tokens += rest.split()
    return " ".join(tokens), phrases


def parse_annotation(path: Path) -> dict[int, list[list[float]]]:
    """entity id -> its boxes (xyxy)."""
    try:
        root = ET.parse(require(path)).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None
    boxes: dict[int, list[list[float]]] = {}
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            ids = [int(name.text) for name in obj.iter("name")]
        except (TypeError, ValueError) as e:  # a missing or non-numeric coordinate / entity id
            raise DatasetError(f"{path}: malformed object ({e})") from None
        for ent in ids:
            boxes.setdefault(ent, []).append(box)
    return boxes


@READERS.register("flickr30k_entities")
def read_flickr30k_entities(root: Path, cfg=None):
    for split in ("train", "val", "test"):
        split_file = root / f"{split}.txt"
        if not split_file.exists():
            continue
        for image_id in read_text(split_file).split():
            sent_path = inside(root / "Sentences", split_file, f"{image_id}.txt")
            ent_boxes = parse_annotation(inside(root / "Annotations", split_file, f"{image_id}.xml"))
            boxes: list[list[float]] = []
            box_index: dict[tuple, int] = {}
            captions, links = [], {}
            for lineno, line in enumerate(read_text(sent_path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text, phrases = parse_sentence(line)
                except ValueError as e:
                    raise DatasetError(f"{sent_path}:{lineno}: {e}") from None
                cap_links = []
                for start, end, ent in phrases:
                    for box in ent_boxes.get(ent, []):
                        idx = box_index.setdefault(tuple(box), len(box_index))
                        if idx == len(boxes):
                            boxes.append(box)
                        cap_links.append([start, end, idx])
                links[str(len(captions))] = cap_links
                captions.append(text)
            yield {"key": make_key("f30k", image_id), "split": split,
                   "source": str(inside(root / "images", split_file, f"{image_id}.jpg")), "captions": captions,
                   "gold": {"boxes": boxes, "labels": [""] * len(boxes), "links": links}}
