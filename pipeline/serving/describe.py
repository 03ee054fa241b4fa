"""Describing new images (`densevse describe [CONFIG] IMAGE...`): a whole-image caption, one phrase per
proposed region, and the dense description.

    densevse describe img.jpg [--model runs/x/models/captioner/best.pt] [--draw out.png] [-s captioner.beam_size=3]

Per image: the image is read and normalised as in preprocessing (stages/images.py; unreadable -> exit 2 naming
the file), regions are proposed by the configured regions stage (Detectron2 with existing weights; any other
stage, e.g. gold_boxes, cannot propose boxes for a new image, so only the whole image is described and the
output says so), EfficientNet-Lite0 features are computed by the configured features stage, then the captioner
(models/captioner.py) writes:
  caption  beam search (captioner.beam_size, default 7 as in DVSA) on the whole image (row 0);
  regions  the top captioner.top_k_regions proposals in detector order, minus any box overlapping a kept one
           by IoU > 0.7, each with its phrase and the phrase's confidence (exp mean word log-prob);
  dense    HM-LSTM's dense description: the regions' phrases, duplicates dropped (the higher-ranked region keeps
           its phrase), ordered left to right by box centre, joined as "a red circle, a blue square and a
           green star". No region (none above the detector threshold): the caption is still written, dense is "".
Output: a JSON array with one {image, caption, caption_score, regions: [{box, phrase, score}], dense, note}.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from densevse.models.captioner import dedup_boxes, dense_description
from densevse.models.detector import resolve
from densevse.stages.regions import Detectron2Regions, RegionParams, predict_boxes


def region_proposer(cfg):
    """(propose(list of JPEG bytes) -> list of (R, 4) boxes, note). propose is None when the configured regions
    stage cannot propose boxes for a new image (not Detectron2, or its weights are missing)."""
    from densevse.stages import REGIONS

    sc = cfg.stages.regions
    if not issubclass(REGIONS.get(sc.impl), Detectron2Regions):
        return None, (f"stages.regions.impl={sc.impl} cannot propose regions for a new image: whole-image caption "
                      f"only (set stages.regions.impl=detectron2 with trained weights for region phrases)")
    params = sc.params.model_dump(include=set(RegionParams.model_fields))  # typed, validated with the config
    config, top_k = params.pop("config"), cfg.captioner.top_k_regions
    params.pop("top_k")
    try:
        resolve(config, params["weights"])
    except FileNotFoundError as e:
        return None, f"no region detector ({e}): whole-image caption only (train one: `densevse regions train`)"

    def propose(jpegs: list[bytes]) -> list[np.ndarray]:
        return predict_boxes(config, jpegs, top_k=max(3 * top_k, 1), **params)

    return propose, ""


def load_image(path: str | Path, max_side: int) -> tuple[bytes, int, int]:
    """JPEG bytes, width, height of an image file, normalised as ingest does; raises Reject for bad files.
    EXIF orientation is applied (a phone photo is described the right way up): a new image has no boxes."""
    from densevse.stages.images import decode_rgb, read_bytes, to_jpeg

    img, _ = decode_rgb(read_bytes(str(path)), max_side=max_side, exif_transpose=True)
    return to_jpeg(img), img.width, img.height


class Describer:
    """Images -> descriptions, with the configured regions and features stages and a trained captioner."""

    def __init__(self, cfg, captioner, propose=None, note: str = ""):
        from densevse.stages import FEATURES, REGIONS

        self.cfg, self.cap, self.propose, self.note = cfg, captioner, propose, note
        fc = cfg.stages.features
        if FEATURES.get(fc.impl).passthrough:  # the regions stage computes the features (detectron2_features)
            rc = cfg.stages.regions
            self.features = REGIONS.get(rc.impl)(rc.params)
            self._featurize = self.features.featurize
        else:
            self.features = FEATURES.get(fc.impl)(fc.params)
            self._featurize = self.features.process
        self.max_side = cfg.stages.ingest.params.max_side

    def featurize(self, jpeg: bytes, w: int, h: int, boxes: np.ndarray) -> np.ndarray:
        from densevse.stages.base import empty_row, npy_bytes, npy_load

        boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), boxes.reshape(-1, 4)])
        row = empty_row(key="describe", image=jpeg, width=w, height=h, boxes=npy_bytes(boxes))
        row = self._featurize([row])[0]
        if row["reject"]:
            raise ValueError(row["reject"])
        feats = npy_load(row["feats"]).astype(np.float32)
        want = self.cap.model.hparams["feat_dim"]
        if feats.shape[1] != want:
            raise ValueError(f"features stage {self.cfg.stages.features.impl} gives {feats.shape[1]}-d features, "
                             f"the captioner was trained on {want}-d ones")
        return feats

    def describe(self, path: str | Path) -> dict:
        """One image's description dict; raises stages.base.Reject for an unreadable image."""
        c = self.cfg.captioner
        jpeg, w, h = load_image(path, self.max_side)
        boxes = np.zeros((0, 4), np.float32)
        if self.propose is not None and c.top_k_regions > 0:
            boxes = dedup_boxes(self.propose([jpeg])[0], c.top_k_regions)
        feats = self.featurize(jpeg, w, h, boxes)
        text, score = self.cap.caption([feats], c.beam_size, c.max_len, c.no_repeat_ngram)[0]
        phrases = self.cap.describe(feats[1:], self.cap.phrase_kind, c.beam_size, c.max_len,
                                    no_repeat_ngram=c.no_repeat_ngram) if len(boxes) else []
        note = self.note or ("" if len(boxes) else "no region above the detector threshold: whole-image caption only")
        return {"image": str(path), "width": w, "height": h, "caption": text, "caption_score": round(score, 4),
                "regions": [{"box": [round(float(v), 1) for v in b], "phrase": p, "score": round(s, 4)}
                            for b, (p, s) in zip(boxes, phrases)],
                "dense": dense_description([p for p, _ in phrases], boxes), "note": note}


def draw(result: dict, out: str | Path) -> Path:
    """The image with its region boxes and phrases, the caption (and dense description) above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from densevse.stages.images import decode_rgb, read_bytes

    img, _ = decode_rgb(read_bytes(result["image"]), max_side=max(result["width"], result["height"]),
                        exif_transpose=True)  # as load_image: the boxes are on the upright photo
    fig, ax = plt.subplots(figsize=(7, 7.6))
    ax.imshow(img)
    colors = plt.cm.tab10.colors
    for i, r in enumerate(result["regions"]):
        x0, y0, x1, y1 = r["box"]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colors[i % 10], lw=2))
        ax.text(x0, y0, r["phrase"], color="white", fontsize=8, va="bottom",
                bbox={"facecolor": colors[i % 10], "alpha": 0.8, "pad": 1})
    title = result["caption"] + (f"\n{result['dense']}" if result["dense"] else "")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


# ---------------------------------------------------------------- commands


