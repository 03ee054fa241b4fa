"""What every dataset reader shares: the READERS registry, stable keys, required files, and the two rules for
hostile annotation files: text is UTF-8 whatever the locale, and image paths stay inside the dataset."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from densevse.models.registry import Registry
from densevse.pipeline.errors import DatasetError

READERS: Registry[Callable[..., Iterator[dict]]] = Registry("dataset reader")


def make_key(prefix: str, name: str) -> str:
    stem = Path(name).stem if "." in Path(name).name else name
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)}"


def require(path: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"missing dataset file {path}")
    return path


def read_text(path: Path) -> str:
    """A dataset text file decoded as UTF-8 (a leading BOM dropped), never the locale's encoding. Undecodable
    bytes become lone surrogates (surrogateescape), so a caption holding them is rejected by the caption check
    (stages/text.py: "caption is not valid UTF-8") at ingest: one bad caption costs itself, not the run."""
    return require(path).read_bytes().decode("utf-8-sig", "surrogateescape")


def read_json(path: Path) -> Any:
    """read_text + JSON; a file that does not parse is a DatasetError naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def linked_dir(path: Path) -> Path:
    """`path`, or where it points when it is a symbolic link stored as a small text file holding a relative
    path (what git writes with core.symlinks=false, and what a copy that does not keep links leaves: the
    flickr8k-1k slice's `images` names `../flickr8k/images` this way). The target must be a folder beside
    `path`'s own folder or below it (at most one `..`), so a dataset cannot point a reader at /etc."""
    if not path.is_file() or path.stat().st_size > 1024:
        return path
    target = path.read_bytes().decode("utf-8", "replace").strip()
    if not target or os.path.isabs(target) or "\n" in target:
        return path
    norm = os.path.normpath(target)
    if norm.split(os.sep)[:2] == ["..", ".."] or norm == "..":
        raise DatasetError(f"{path} links to {target!r}, outside the datasets folder")
    resolved, parts = path.parent, norm.split(os.sep)
    while parts and parts[0] == "..":  # climbed lexically: works for a UPath as for a Path
        resolved, parts = resolved.parent, parts[1:]
    resolved = resolved.joinpath(*parts)
    return resolved if resolved.is_dir() else path


def inside(base: Path, source: Path, *parts) -> Path:
    """base / parts... for a path the annotation file `source` names; a DatasetError naming both when a part is
    not text or not UTF-8, is absolute, or the joined path climbs out of base with '..'. An annotation file
    decides which files a run reads (and ships into shards), so a wrong or hostile one stops the run before any
    work instead of reading /etc/passwd as an image. Lexical: symlinks inside the dataset folder are allowed."""
    for p in parts:
        if not isinstance(p, str) or "\0" in p:
            raise DatasetError(f"{source}: image path part {p!r} is not a file name")
        if os.path.isabs(p):
            raise DatasetError(f"{source}: image path {p!r} is absolute; it must be relative to {base}")
    rel = "/".join(p for p in parts if p)  # Karpathy's filepath may be empty
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(f"{source}: image path {rel!r} is not valid UTF-8") from None
    norm = os.path.normpath(rel) if rel else "."
    if norm == ".":
        raise DatasetError(f"{source}: image path {rel!r} names no file")
    if norm == ".." or norm.startswith(".." + os.sep):
        raise DatasetError(f"{source}: image path {rel!r} leaves the dataset folder {base}")
    return base / norm
