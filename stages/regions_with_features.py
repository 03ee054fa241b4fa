"""Boxes and region features from one detector pass: the `detectron2_features` regions stage.

The project's detector (models/detector.py) runs the frozen ImageNet EfficientNet-Lite0 as its bottom-up
backbone, and the `efficientnet_lite0` features stage ran that same network again on every image. Here the
detector's own last bottom-up map (s5, stride 32, 320 channels) is kept from its forward pass (a forward hook),
put through EfficientNet-Lite0's ImageNet 1x1 head (320 -> 1280, as `extract_features` ends) and ROIAligned
on each selected box, as stages/features.py does on its own pass: the same 1280-d float16 `feats`, one row per
box, row 0 the whole image. The features stage is then `from_regions` (stages/features.py), which the
orchestrator leaves out. Only the input size differs from the separate stages: the detector's test size
(its shorter side) instead of features.params.input_size (longer side, letterboxed).
"""
from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
from pydantic import Field

from densevse.stages.base import REGIONS, _feats, npy_bytes, npy_load
from densevse.stages.regions import Detectron2Regions, RegionParams

log = logging.getLogger("densevse.stages")
BACKBONES = ("build_efficientnet_fpn_backbone", "build_efficientnet_lite0_fpn_backbone")
STAGES_ALL = 5  # EfficientNet-Lite resolution stages: FREEZE_STAGES=5 keeps the whole network at ImageNet weights


class RegionFeatureParams(RegionParams):
    model_paths: ClassVar[tuple[str, ...]] = ("config", "weights", "head_weights")
    head_weights: str | None = None  # EfficientNet-Lite0 weights for the 1x1 head (default: the shipped ImageNet)
    roi_size: int = Field(3, ge=1, le=14)  # ROIAlign output grid, averaged into one vector (as features.roi_size)


@REGIONS.register("detectron2_features")
class Detectron2RegionFeatures(Detectron2Regions):
    """`detectron2` boxes plus their EfficientNet-Lite0 features from the detector's own backbone maps."""

    Params = RegionFeatureParams
    provides_feats = True
    dim = 1280
    level = "s5"

    def __init__(self, params=None):
        super().__init__(params)
        import torch

        from densevse.models.efficientnet import load_efficientnet_lite0

        e = self.cfg.MODEL.EFFICIENTNET
        if self.cfg.MODEL.BACKBONE.NAME not in BACKBONES or e.NAME != "efficientnet-lite0":
            raise ValueError(f"stages.regions.impl=detectron2_features needs a detector with the EfficientNet-Lite0 "
                             f"backbone; {self.params.config} has {self.cfg.MODEL.BACKBONE.NAME} ({e.NAME}): use "
                             f"regions.impl=detectron2 with a features stage instead")
        bottom_up = self.model.backbone.bottom_up
        if self.level not in bottom_up.output_shape():
            raise ValueError(f"detector {self.params.config}: MODEL.EFFICIENTNET.OUT_FEATURES lacks {self.level}")
        if e.FREEZE_STAGES < STAGES_ALL:
            log.warning("detector %s fine-tuned EfficientNet stages above %d: its features are not the ImageNet "
                        "ones the features stage computes", self.params.config, e.FREEZE_STAGES)
        net = load_efficientnet_lite0(self.params.head_weights)
        self.head = torch.nn.Sequential(net._conv_head, net._bn1, net._swish).to(self.model.device).eval()
        self._maps: dict = {}
        bottom_up.register_forward_hook(lambda _m, _i, out: self._maps.update(fmap=out[self.level]))

    def detect(self, ready: list) -> None:
        """Boxes as `detectron2` selects them, then each box's feature from the same forward pass's map."""
        self._maps.clear()
        super().detect(ready)
        self.pool(ready, self._maps.pop("fmap"))

    def pool(self, ready: list, fmap) -> None:
        """`feats` for the `boxes` of each (row, input, (sx, sy), transform) entry, from the batch's s5 map
        (the padded model input at stride 32; padding is bottom/right, so input pixels map by scale only)."""
        import torch
        from torchvision.ops import roi_align

        rois = []
        for i, (row, _, (sx, sy), tf) in enumerate(ready):
            b = tf.apply_box(npy_load(row["boxes"]) * np.array([sx, sy, sx, sy], np.float32))  # model-input px
            rois.append(np.concatenate([np.full((len(b), 1), i, np.float32), b.astype(np.float32)], axis=1))
        with torch.inference_mode():
            boxes = torch.from_numpy(np.concatenate(rois)).to(fmap.device)
            stride = self.model.backbone.bottom_up.output_shape()[self.level].stride
            feats = roi_align(self.head(fmap), boxes, output_size=self.params.roi_size, spatial_scale=1 / stride,
                              sampling_ratio=2, aligned=True).mean(dim=(2, 3)).cpu().numpy()
        feats = _feats(feats, len(boxes))
        start = 0
        for (row, *_), r in zip(ready, rois):
            row["feats"] = npy_bytes(feats[start:start + len(r)])
            start += len(r)

    def featurize(self, rows: list[dict]) -> list[dict]:
        """`feats` for rows that already have `boxes` (a new image described with chosen boxes): the bottom-up
        backbone only, no detection; the features-stage interface (stages.base.box_features rules)."""
        import torch

        from densevse.stages.base import box_features
        from densevse.stages.features import row_boxes

        def prepare(row):
            n, entries = len(row_boxes(row)), []  # bad boxes reject the row here
            self._prepare(row, entries)
            return entries[0], n

        def extract(entries):
            with torch.inference_mode():
                x = self.model.preprocess_image([d for _, d, _, _ in entries]).tensor
                fmap = self.model.backbone.bottom_up(x)[self.level]
            self.pool(entries, fmap)
            return np.concatenate([npy_load(row["feats"]) for row, *_ in entries])

        return box_features(self.name, rows, prepare, extract)
