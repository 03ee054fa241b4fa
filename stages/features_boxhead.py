"""Region features from the detector: the `detectron2_boxhead` features stage, an alternative to the default
(stages/features.py, ROIAlign on one EfficientNet-Lite0 pass per image); bench/bench_regions.py compares them.

The trained detector's own box head (FPN level chosen by box size, ROIAlign 7x7, two FC layers): the features
Faster R-CNN classifies with; one backbone pass per image. float16, one row per box, row 0 = the whole image.
"""
from __future__ import annotations

import numpy as np

from densevse.stages.base import FEATURES, box_features
from densevse.stages.features import row_boxes
from densevse.stages.images import to_array
from densevse.stages.regions import DetectorStage


@FEATURES.register("detectron2_boxhead")
class Detectron2BoxHeadFeatures(DetectorStage):
    """The detector's box-head representation (cfg.MODEL.ROI_BOX_HEAD.FC_DIM wide) of each given box."""

    name = "features"

    @property
    def dim(self) -> int:
        return self.model.roi_heads.box_head.output_shape.channels

    def process(self, rows: list[dict]) -> list[dict]:
        import torch
        from detectron2.structures import Boxes

        def prepare(row):
            b = row_boxes(row)
            t, tf = self.to_input(to_array(row["image"]))
            return ({"image": t}, Boxes(torch.from_numpy(tf.apply_box(b).astype(np.float32)).to(self.model.device))), len(b)

        def extract(inputs):
            images, boxes = zip(*inputs)
            m, rh = self.model, self.model.roi_heads
            with torch.inference_mode():
                fmaps = m.backbone(m.preprocess_image(list(images)).tensor)
                return rh.box_head(rh.box_pooler([fmaps[f] for f in rh.box_in_features], list(boxes))).cpu().numpy()

        return box_features(self.name, rows, prepare, extract)
