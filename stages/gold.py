"""Stand-ins that read gold annotations: regions from gold boxes, trees from gold PTB strings.

They let the synthetic set (whose gold is exact) run the whole pipeline without a trained detector or
parser, and give the upper bound the learned stages are compared with.
"""
from __future__ import annotations

import json

import numpy as np

from densevse.models import trees
from densevse.stages.base import PARSE, REGIONS, Reject, Stage, npy_bytes


def whole_image_box(width: int, height: int) -> list[float]:
    return [0.0, 0.0, float(width), float(height)]


def attach_tree(caption: dict, tree: dict) -> dict:
    """The caption entry the shards carry: text, tree, phrases. Shared by every parse stage."""
    trees.validate(tree)
    return {**caption, "text": " ".join(tree["tokens"]), "tree": tree, "phrases": trees.phrases(tree)}


@REGIONS.register("gold_boxes")
class GoldBoxes(Stage):
    """Regions = the whole image + the dataset's gold boxes (row 0 is the whole image, as everywhere)."""

    name = "regions"

    def process_row(self, row: dict) -> None:
        gold = json.loads(row["gold"])
        boxes = [whole_image_box(row["width"], row["height"])] + list(gold.get("boxes", []))
        row["boxes"] = npy_bytes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))


@REGIONS.register("whole_image")
class WholeImage(Stage):
    """Regions = the whole image only, whatever boxes the dataset has: the image side of a model trained
    without regions (e.g. on Flickr8k, which has none), evaluated on a dataset with boxes (COCO)."""

    name = "regions"

    def process_row(self, row: dict) -> None:
        row["boxes"] = npy_bytes(np.asarray([whole_image_box(row["width"], row["height"])], dtype=np.float32))


@PARSE.register("gold_trees")
class GoldTrees(Stage):
    """Trees from the dataset's gold PTB strings; a caption without one is rejected with that reason."""

    name = "parse"

    def process_row(self, row: dict) -> None:
        gold_trees = json.loads(row["gold"]).get("trees", {})
        kept, rejects = [], json.loads(row["caption_rejects"])
        for c in json.loads(row["captions"]):
            ptb = gold_trees.get(str(c["index"]))
            try:
                if ptb is None:
                    raise trees.TreeError("the dataset has no gold tree for this caption")
                kept.append(attach_tree(c, trees.from_ptb(ptb)))
            except trees.TreeError as e:
                rejects.append({"index": c["index"], "text": c["text"], "reason": f"gold tree: {e}"})
        row["captions"], row["caption_rejects"] = json.dumps(kept), json.dumps(rejects)
        if not kept:
            raise Reject("no caption with a usable tree")
