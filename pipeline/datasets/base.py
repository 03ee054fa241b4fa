"""What every dataset reader shares: the READERS registry, stable keys, required files."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

from models.registry import Registry
from pipeline.errors import DatasetError

READERS: Registry[Callable[..., Iterator[dict]]] = Registry("dataset reader")


def make_key(prefix: str, name: str) -> str:
    stem = Path(name).stem if "." in Path(name).name else name
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)}"


def require(path: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"missing dataset file {path}")
    return path
