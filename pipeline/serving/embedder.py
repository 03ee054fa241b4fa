"""Raw images and captions -> the embedding space, through the very stages that preprocessed the training data.

    e = Embedder.from_checkpoint("runs/default/models/hmlstm/best.pt")   # the stages of the checkpoint's run
    e.images([jpeg_bytes_or_path])  -> [{"boxes": (R, 4), "image": (E,), "regions": (R-1, E)}]
    e.texts(["a dog catches a frisbee"]) -> [{"tokens", "tree", "sentence": (E,), "phrases": (P, E), "spans"}]

A new image goes through ingest (decode, EXIF, resize, JPEG), the regions stage and the features stage, in
this process, one row each, exactly as `densevse preprocess` runs them on Ray; a caption through ingest's
caption check and the parse stage. So a photo embedded here and the same photo read from its shard give the
same vectors (up to the float16 the shards store features in, which is applied here too). Stages are built
on first use: text-only callers never load Detectron2.

What a stage cannot do for a new input: gold_boxes has no boxes for a new image (the whole image only),
gold_trees has no tree for a new caption (BadInput says so).
Bad input (not an image, too large, an empty or non-English caption) raises BadInput naming the item.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from models.batch import collate
from pipeline.errors import BadInput
from pipeline.preprocess.shards import file_sha256

STAGE_ORDER = ("ingest", "regions", "features", "parse")


def stage_configs(config: dict) -> dict[str, tuple[str, Any]]:
    """(impl, typed params) per stage of a run config dict (a checkpoint's "config"), validated as pipeline.yaml."""
    from pipeline.config import StagesConfig

    stages = StagesConfig.model_validate(config.get("stages") or {})
    return {name: (getattr(stages, name).impl, getattr(stages, name).params) for name in STAGE_ORDER}


def bundled_paths(stages: dict[str, tuple[str, Any]]) -> dict[str, Path]:
    """The local model files of the stages, keyed "<stage>.<field>" (MLflow artifact names): what a registered
    model must carry to run them elsewhere. The default ImageNet weights of the features stage (or of the
    combined regions stage's head) are included."""
    from models.efficientnet import default_weights
    from pipeline.preprocess.ship import local_model_paths

    out = {}
    for name, (_, params) in stages.items():
        for field, path in local_model_paths(params).items():
            out[f"{name}.{field}"] = path
        if "weights" in getattr(params, "model_paths", ()) and name == "features" and params.weights is None:
            out[f"{name}.weights"] = Path(default_weights())
        if "head_weights" in getattr(params, "model_paths", ()) and params.head_weights is None:  # detectron2_features
            out[f"{name}.head_weights"] = Path(default_weights())
    return out


def with_paths(stages: dict[str, tuple[str, Any]], paths: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """`stages` with each "<stage>.<field>" of `paths` pointing at the given local path (unbundled artifacts)."""
    out = dict(stages)
    for key, path in paths.items():
        name, _, field = key.partition(".")
        if name in out and field:
            impl, params = out[name]
            out[name] = (impl, params.model_copy(update={field: str(path)}))
    return out


def load(source: str | Path) -> Embedder:
    """An Embedder from a checkpoint file (best.pt: the stages of its run config, paths as there) or an MLflow
    model URI (models:/densevse-hmlstm@champion, runs:/...: the stage models bundled with it)."""
    s = str(source)
    if "://" in s or s.startswith("models:/") or s.startswith("runs:/"):
        import mlflow.pyfunc

        py = mlflow.pyfunc.load_model(s).unwrap_python_model()
        if not hasattr(py, "embedder"):
            raise ValueError(f"{s} is not a DenseVSE embedding model ({type(py).__name__})")
        e = py.embedder
        e.identity.update(source=s, sha256=file_sha256(py.checkpoint_path))
        return e
    if not Path(s).is_file():
        raise FileNotFoundError(f"no model checkpoint at {s}")
    return Embedder.from_checkpoint(s)


class Embedder:
    """A trained embedding model + the stages of its run (see the module docstring)."""

    def __init__(self, model, vocab, labels, stages: dict[str, tuple[str, Any]], identity: dict | None = None):
        self.model, self.vocab, self.labels = model.eval(), vocab, labels
        self.stages, self._built = stages, {}
        self.dim = int(model.hparams["embed"])
        # What an index records and a query checks: the same weights, not only the same shape.
        self.identity = {"model": type(model).__name__, "dim": self.dim, **(identity or {})}

    @classmethod
    def from_checkpoint(cls, path: str | Path, stages: dict | None = None) -> Embedder:
        from models.checkpoint import load_model

        model, vocab, labels, ck = load_model(path)
        identity = {"model": ck["model_name"], "source": str(Path(path).resolve()), "sha256": file_sha256(path)}
        return cls(model, vocab, labels, stages or stage_configs(ck.get("config") or {}), identity)

    def _stage(self, name: str):
        if name not in self._built:
            from stages import STAGES

            impl, params = self.stages[name]
            self._built[name] = STAGES.get(impl)(params)
        return self._built[name]

    # ---- images
    def image_rows(self, images: Sequence[bytes | str | Path]) -> list[dict]:
        """Shard-like rows (boxes, feats as float16 as stored) of raw images: bytes or local paths."""
        from stages.base import empty_row

        rows = []
        for i, im in enumerate(images):
            data = bytes(im) if isinstance(im, (bytes, bytearray)) else b""
            rows.append(empty_row(key=f"item{i}", source="" if data else str(im), image=data,
                                  captions=json.dumps(["image"])))  # ingest needs a caption; unused
        for name in ("ingest", "regions", "features"):  # gold_boxes: a new image has none, row 0 only
            rows = self._stage(name).process(rows)
        bad = [(i, r["reject"]) for i, r in enumerate(rows) if r["reject"]]
        if bad:
            raise BadInput("; ".join(f"image {i}: {reason}" for i, reason in bad))
        return rows

    @torch.no_grad()
    def images(self, images: Sequence[bytes | str | Path]) -> list[dict]:
        from stages.base import npy_load

        rows = self.image_rows(images)
        items = [({"key": r["key"], "feats": npy_load(r["feats"]).astype(np.float32),
                   "boxes": npy_load(r["boxes"]).astype(np.float32), "meta": {}}, []) for r in rows]
        return self.encode_images(items)

    @torch.no_grad()
    def encode_images(self, items: list[tuple[dict, list]]) -> list[dict]:
        """Samples as read from shards ({"feats", "boxes"} with row 0 the whole image) -> their vectors."""
        b = collate(items, self.vocab, self.labels)
        e = self.model.encode_images(b)
        out = []
        for j, (s, _) in enumerate(items):
            n = int(b.valid[j].sum())
            out.append({"boxes": s["boxes"][:n], "image": e["image"][j].numpy(),
                        "regions": e["regions"][j, 1:n].numpy()})
        return out

    # ---- texts
    def parse(self, texts: Sequence[str]) -> list[dict]:
        """Captions -> {"index", "text", "tree", "phrases"} through ingest's caption check and the parse stage."""
        from stages.ingest import check_caption

        impl, _ = self.stages["parse"]
        if impl == "gold_trees":
            raise BadInput("this model's run used gold trees (stages.parse.impl=gold_trees): it has no parser "
                           "for new text; embed trees instead, or configure stages.parse.impl=stanza")
        words = self.stages["ingest"][1].max_caption_words
        caps, bad = [], []
        for i, t in enumerate(texts):
            clean, reason = check_caption(t, words)
            if reason:
                bad.append((i, reason))
            caps.append(clean)
        if not bad:
            trees, reasons = self._stage("parse").parse_texts(caps)
            bad = [(i, r) for i, r in enumerate(reasons) if r]
        if bad:
            raise BadInput("; ".join(f"text {i}: {reason}" for i, reason in bad))
        from models import trees as T

        return [{"index": i, "text": " ".join(tr["tokens"]), "tree": tr, "phrases": T.phrases(tr)}
                for i, tr in enumerate(trees)]

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> list[dict]:
        return self.encode_captions(self.parse(texts))

    @torch.no_grad()
    def encode_captions(self, caps: list[dict]) -> list[dict]:
        """Parsed captions ({"tree", "phrases"}, as in shards) -> sentence and phrase vectors with their spans."""
        if not caps:
            return []
        caps = [{**c, "index": k} for k, c in enumerate(caps)]
        dim = self.model.hparams["feat_dim"]
        dummy = {"key": "text", "feats": np.zeros((1, dim), np.float32), "boxes": np.zeros((1, 4), np.float32),
                 "meta": {}}
        b = collate([(dummy, caps)], self.vocab, self.labels)
        e = self.model.encode_texts(b)
        out = []
        for k, c in enumerate(caps):
            out.append({"tokens": c["tree"]["tokens"], "tree": c["tree"], "sentence": e["sentence"][k].numpy(),
                        "phrases": e["phrases"][b.phrase_caption == k].numpy(),
                        "spans": [{"start": p["start"], "end": p["end"], "label": p["label"],
                                   "text": " ".join(c["tree"]["tokens"][p["start"]:p["end"]])}
                                  for p in c["phrases"]]})
        return out
