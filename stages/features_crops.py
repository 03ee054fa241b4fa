"""Region features from crops: the `efficientnet_lite0_crops` features stage, an alternative to the default
(stages/features.py, ROIAlign on one EfficientNet-Lite0 pass per image); bench/bench_regions.py compares them.

Each box is cropped from the image, warped to crop_size^2 and run through the same ImageNet EfficientNet-Lite0
(R-CNN style): the network sees every region at full resolution with no context bleeding in, but pays one
forward pass per box. float16, one row per box, row 0 = the whole image (as every stage does).
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from densevse.stages.base import FEATURES, box_features
from densevse.stages.features import EfficientNetParams, EfficientNetStage, row_boxes
from densevse.stages.images import to_array


class CropParams(EfficientNetParams):
    crop_size: int = Field(128, ge=32, le=512)  # each region is warped to crop_size x crop_size
    context: float = Field(0.0, ge=0, le=1)  # grow each box by this fraction of its size per side first
    chunk: int = Field(64, ge=1)  # crops per forward pass (memory bound)


@FEATURES.register("efficientnet_lite0_crops")
class EfficientNetCropFeatures(EfficientNetStage):
    """One EfficientNet-Lite0 pass per region crop, global-average-pooled to 1280-d."""

    name = "features"
    Params = CropParams

    def crops(self, img: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = img.shape[:2]
        pil, s, c = Image.fromarray(img), self.params.crop_size, self.params.context
        out = np.empty((len(boxes), s, s, 3), np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            dx, dy = (x1 - x0) * c, (y1 - y0) * c
            x0, y0, x1, y1 = max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)
            if x1 - x0 < 1 or y1 - y0 < 1:  # degenerate box: a 1-px crop at its corner
                x0, y0 = min(max(0, x0), w - 1), min(max(0, y0), h - 1)
                x1, y1 = x0 + 1, y0 + 1
            out[i] = np.asarray(pil.resize((s, s), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1)))
        return out

    def process(self, rows: list[dict]) -> list[dict]:
        import torch

        def prepare(row):
            c = self.crops(to_array(row["image"]), row_boxes(row))
            return c, len(c)

        def extract(crops):
            allc, feats = np.concatenate(crops), []
            with torch.inference_mode():
                for i in range(0, len(allc), self.params.chunk):
                    x = torch.from_numpy(allc[i:i + self.params.chunk]).to(self.device).permute(0, 3, 1, 2).float()
                    feats.append(self.model.extract_features((x - self.mean) / self.std).mean(dim=(2, 3)).cpu().numpy())
            return np.concatenate(feats)

        return box_features(self.name, rows, prepare, extract)
