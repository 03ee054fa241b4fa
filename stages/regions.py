"""Region proposals with Detectron2 (Faster R-CNN): the `detectron2` stage and the base of every stage that runs
the detector.

The stage writes `boxes`: row 0 is the whole image, then up to `top_k` detector boxes (Karpathy & Fei-Fei use
the whole image + 19 regions). Detections are class-agnostic in effect: any class counts as "a region".
Model building (config, backbone, weights) is in models/detector.py; training the project's own detector in
pipeline/stage_models/detector.py. Detectron2 and torch import lazily: importing `stages` stays cheap.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from densevse.models.detector import build_detector, default_detector_dir, load_cfg, resolve
from densevse.stages.base import REGIONS, Params, Reject, Stage, guarded, is_transient, npy_bytes
from densevse.stages.images import decode_rgb


class DetectorParams(Params):
    """Which Detectron2 detector to load and how to feed it; shared by every stage that runs one."""
    model_paths: ClassVar[tuple[str, ...]] = ("config", "weights")  # shipped to every node (pipeline/ship.py)
    # A `densevse regions train` output dir (config.yaml + model_final.pth), a Detectron2 config file, or a
    # model-zoo name such as COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml.
    config: str = str(default_detector_dir())
    weights: str | None = None  # URL or local .pth, used as-is; default: <config dir>/model_final.pth
    input_size: int | None = Field(None, ge=32, le=2048)  # test-time shorter side (default: the config's)
    max_input_size: int = Field(1024, ge=64, le=4096)  # longer side cap; bigger images are downscaled first
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per actor (default: torch's)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v != "cpu" and not v.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {v!r}")
        return v



class DetectorStage(Stage):
    """Base of the stages that run the detector: in each actor the model, its test-time resize and channel
    order. Subclasses tune the config in `configure`. Files are checked (and the project's default detector
    trained) before a run by pipeline/preprocess/prepare.py."""

    Params = DetectorParams
    uses_model = True

    def __init__(self, params=None):
        super().__init__(params)
        import torch
        from detectron2.data import transforms as T

        p = self.params
        if p.threads:
            torch.set_num_threads(p.threads)
        config, weights = resolve(p.config, p.weights)  # fails here, naming the path, before any work
        cfg = load_cfg(config)
        if p.input_size:
            cfg.INPUT.MIN_SIZE_TEST = p.input_size
        cfg.INPUT.MAX_SIZE_TEST = min(cfg.INPUT.MAX_SIZE_TEST, p.max_input_size)
        self.configure(cfg)
        self.cfg = cfg
        self.model = build_detector(cfg, weights, p.device)
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.bgr = cfg.INPUT.FORMAT == "BGR"

    def configure(self, cfg) -> None:
        """Stage-specific config changes before the model is built."""

    def to_input(self, a: np.ndarray):
        """(CHW float tensor the model takes, the resize transform) for an RGB uint8 array."""
        import torch

        tf = self.resize.get_transform(a)
        x = tf.apply_image(a)
        if self.bgr:
            x = x[:, :, ::-1]
        return torch.as_tensor(np.ascontiguousarray(x.transpose(2, 0, 1))).float(), tf


class RegionParams(DetectorParams):
    score_thresh: float = Field(0.05, ge=0, le=1)
    top_k: int = Field(19, ge=1, le=300)  # detector boxes per image (+ the whole image as row 0)
    nms_iou: float = Field(0.5, gt=0, le=1)
    min_size: float = Field(4.0, ge=0)  # drop boxes narrower or shorter than this (original pixels)


@REGIONS.register("detectron2")
class Detectron2Regions(DetectorStage):
    """Whole image + top-k Faster R-CNN boxes per image; one batched forward pass per batch."""

    name = "regions"
    Params = RegionParams

    def configure(self, cfg) -> None:
        p = self.params
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = p.score_thresh
        cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = p.nms_iou
        cfg.TEST.DETECTIONS_PER_IMAGE = max(p.top_k * 3, 50)  # headroom for min_size filtering

    def _prepare(self, row: dict, ready: list) -> None:
        img, scale = decode_rgb(row["image"], max_side=self.params.max_input_size)
        a = np.asarray(img)
        if min(a.shape[:2]) < 2:
            raise Reject(f"image too small for detection ({a.shape[1]}x{a.shape[0]})")
        h, w = a.shape[:2]
        if scale != 1.0:  # downscaled: map boxes back per axis (rounding made the two scales differ)
            with Image.open(io.BytesIO(row["image"])) as orig:
                scale = (w / orig.width, h / orig.height)
        t, tf = self.to_input(a)
        sx, sy = scale if isinstance(scale, tuple) else (scale, scale)
        ready.append((row, {"image": t, "height": h, "width": w}, (sx, sy), tf))

    def process(self, rows: list[dict]) -> list[dict]:
        ready: list = []
        for row in rows:
            if not row["reject"]:
                guarded(self.name, row, lambda r: self._prepare(r, ready))
        if not ready:
            return rows
        try:
            self.detect(ready)
        except Exception as e:  # noqa: BLE001 - one bad image must not sink its batch: retry one by one
            if is_transient(e):  # out of memory etc.: the shard is retried, never a rejection
                raise
            for entry in ready:
                try:
                    self.detect([entry])
                except Exception as e1:  # noqa: BLE001
                    if is_transient(e1):
                        raise
                    entry[0]["reject"] = f"{self.name}: detector failed ({type(e1).__name__}: {e1})"
        return rows

    def detect(self, ready: list) -> None:
        """One forward pass over the prepared (row, model input, (sx, sy), transform) entries; sets `boxes`."""
        import torch

        with torch.inference_mode():
            outs = self.model([d for _, d, _, _ in ready])
        for (row, d, (sx, sy), _), out in zip(ready, outs):
            inst = out["instances"].to("cpu")
            boxes = inst.pred_boxes.tensor.numpy() / np.array([sx, sy, sx, sy], np.float32)  # row image pixels
            row["boxes"] = npy_bytes(self.select(boxes, inst.scores.numpy(), round(d["width"] / sx),
                                                 round(d["height"] / sy)))

    def select(self, boxes: np.ndarray, scores: np.ndarray, w: float, h: float) -> np.ndarray:
        """Whole image first, then the top-k boxes (score order) that pass min_size, clipped to the image."""
        boxes = boxes.reshape(-1, 4).astype(np.float32)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        side = self.params.min_size
        ok = ((boxes[:, 2] - boxes[:, 0]) >= side) & ((boxes[:, 3] - boxes[:, 1]) >= side)
        order = np.argsort(-scores[ok], kind="stable")[: self.params.top_k]
        whole = np.array([[0, 0, w, h]], dtype=np.float32)
        return np.concatenate([whole, boxes[ok][order]]).astype(np.float32)


# ---------------------------------------------------------------- recall

def predict_boxes(weights_dir: str | Path, images: Sequence, top_k: int = 19, **params) -> list[np.ndarray]:
    """Detector boxes per image (score order, without the whole-image row 0) for JPEG/PNG bytes, PIL images
    or HxWx3 uint8 arrays; a rejected image raises ValueError."""
    stage = Detectron2Regions({"config": str(weights_dir), "top_k": top_k, **params})
    rows = []
    for im in images:
        if not isinstance(im, (bytes, bytearray)):
            im = Image.fromarray(im) if isinstance(im, np.ndarray) else im
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            im = buf.getvalue()
        rows.append({"image": bytes(im), "boxes": b"", "reject": ""})
    preds = []
    for i in range(0, len(rows), 8):
        for r in stage.process(rows[i:i + 8]):
            if r["reject"]:
                raise ValueError(f"image rejected: {r['reject']}")
            preds.append(np.load(io.BytesIO(r["boxes"]))[1:])
    return preds


