"""Reader for the embedded synthetic set; generates it first when absent (see pipeline/datasets/synthetic.py)."""
from __future__ import annotations

import json
from pathlib import Path

from densevse.pipeline.datasets.base import READERS
from densevse.pipeline.datasets.synthetic import generate


@READERS.register("synthetic")
def read_synthetic(root: Path, cfg):
    data = json.loads(generate(root, cfg.synthetic).read_text())
    for r in data["images"]:
        yield {"key": r["key"], "split": r["split"], "source": str(root / r["file"]), "captions": r["captions"],
               "gold": {"boxes": r["boxes"], "labels": r["labels"],
                        "trees": {str(i): t for i, t in enumerate(r["trees"])}, "links": r["links"]}}
