"""The registered MLflow models: a trained checkpoint behind mlflow.pyfunc.

EmbeddingPyfunc (registered as cfg.mlflow.registered_model; the best version has the alias `champion`) embeds
raw inputs, or features for users who have them. Input: a DataFrame, one row per item, one of
    image  str                base64 JPEG/PNG, or a base64 data: URI (never a path or URL: this is what
                              REST callers send, see `image_bytes`)
    text   str                a raw caption
    feats  list[list[float]]  (R, D) region features of an image, row 0 = the whole image (as in the shards)
    boxes  list[list[float]]  (R, 4) their xyxy pixel boxes, row 0 = the whole image
    tree   str                a caption's constituency tree as JSON (models/trees.py format)
Output, per row: embedding (the image / sentence vector), parts (the region vectors of an image, boxes rows
1..; or the phrase vectors of a sentence), boxes (an image's (R, 4) boxes, row 0 = the whole image), tokens,
tree (JSON) and spans ([{start, end, label, text}] per phrase) of a text row.

A raw image runs through the detector, feature extractor and (for text) parser of the training run, bundled
with the model as artifacts ("<stage>.<field>", see pipeline/serving/embedder.py): the same stage code as
preprocessing, so the vectors match the shards'. Only those bundled files are loaded: model paths, URLs and
`.pkl` weights in the checkpoint's own config never are (embedder.trusted_stages). Bad input (not an image, too
large, an empty caption) raises MlflowException INVALID_PARAMETER_VALUE naming the row, which `mlflow models
serve` answers with HTTP 400.

Registered as models-from-code (embedding_model.py, captioner_model.py: MLflow runs that file, it unpickles
nothing); models registered before that hold a cloudpickled instance of these classes and load as before.

    m = mlflow.pyfunc.load_model("models:/densevse-hmlstm@champion")
    m.predict(pd.DataFrame({"image": [b64_jpeg, None], "text": [None, "a red circle left of a blue square"]}))
"""
from __future__ import annotations

import base64
import binascii
import json
import math

import mlflow.pyfunc
import numpy as np

from densevse.models.captioner import Captioner
from densevse.models.mrnn import SENTENCE

INPUTS = ("image", "text", "feats", "boxes", "tree")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "text", required=False),
                     ColSpec(Array(Array("double")), "feats", required=False),
                     ColSpec(Array(Array("double")), "boxes", required=False),
                     ColSpec("string", "tree", required=False)])
    outputs = Schema([ColSpec(Array("double"), "embedding"), ColSpec(Array(Array("double")), "parts"),
                      ColSpec(Array(Array("double")), "boxes", required=False),
                      ColSpec(Array("string"), "tokens", required=False), ColSpec("string", "tree", required=False),
                      ColSpec("string", "spans", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


IMAGE_FORMS = "an image must be base64 or a base64 data: URI (paths and URLs are not taken over the model's API)"


def image_bytes(value, row: int) -> bytes:
    """An `image` cell -> its bytes: base64, or a data: URI with base64 content. Anything else (a path, file://,
    http(s)://) gets one reason, whatever it names: the server never opens or fetches what a caller sends, and
    an error never tells an existing file from a missing one. (In-process callers pass paths to
    Embedder.images.)"""
    v = value.strip() if isinstance(value, str) else ""
    if v.startswith("data:"):
        head, _, v = v.partition(",")
        if not head.endswith(";base64"):
            v = ""
    try:
        data = base64.b64decode(v, validate=True) if v and ":" not in v else b""
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise ValueError(f"row {row}: {IMAGE_FORMS}")
    return data


class EmbeddingPyfunc(mlflow.pyfunc.PythonModel):
    """mlflow.pyfunc wrapper of a trained checkpoint (module docstring)."""

    def load_context(self, context):
        from densevse.models.checkpoint import load_model

        self.checkpoint_path = context.artifacts["checkpoint"]
        self.model, self.vocab, self.labels, self.ck = load_model(self.checkpoint_path)
        self.stage_artifacts = {k: v for k, v in context.artifacts.items() if k != "checkpoint"}
        self._embedder = None

    @property
    def embedder(self):
        """The raw-input path, built on first use (a features-only caller never loads Detectron2 or Stanza)."""
        if getattr(self, "_embedder", None) is None:
            self._embedder = self.make_embedder()
        return self._embedder

    def make_embedder(self, given=None):
        """An Embedder whose stage models are the bundled ones, then those of `given` (an in-process caller's
        own stage config); never a path from the checkpoint's config (embedder.trusted_stages)."""
        from densevse.pipeline.serving.embedder import Embedder

        return Embedder.from_loaded(self.model, self.vocab, self.labels, self.ck, {"model": self.ck["model_name"]},
                                    bundled=getattr(self, "stage_artifacts", {}), given=given)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        from densevse.pipeline.errors import BadInput
        from densevse.pipeline.serving.embedder import UntrustedModelFile

        try:
            return pd.DataFrame(self._predict(pd.DataFrame(model_input)))
        except UntrustedModelFile as e:  # the model's fault, not the request's: 500
            raise MlflowException(str(e), error_code=INTERNAL_ERROR) from e
        except (BadInput, ValueError, KeyError) as e:  # the caller's input: 400 behind `mlflow models serve`
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e

    def _predict(self, df) -> list[dict]:
        import torch

        from densevse.models import trees

        def get(row, col):
            v = row.get(col)
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

        records = df.to_dict("records")
        out: list = [None] * len(records)
        kinds = {}
        for i, r in enumerate(records):
            given = [c for c in INPUTS if get(r, c) is not None]
            kind = next((c for c in ("image", "text", "feats", "tree") if c in given), None)
            if kind is None:
                raise ValueError(f"row {i} has none of {list(INPUTS)}")
            kinds.setdefault(kind, []).append(i)
        with torch.no_grad():
            if "image" in kinds:
                rows = kinds["image"]
                res = self.embedder.images([image_bytes(records[i]["image"], i) for i in rows])
                for i, e in zip(rows, res):
                    out[i] = _image_out(e)
            if "feats" in kinds:
                items = []
                for i in kinds["feats"]:
                    f = np.asarray([np.asarray(x, np.float32) for x in records[i]["feats"]], np.float32)
                    bx = get(records[i], "boxes")
                    if bx is None:
                        raise ValueError(f"row {i}: an image needs 'boxes' (R, 4) along with 'feats'")
                    bx = np.asarray([np.asarray(x, np.float32) for x in bx], np.float32).reshape(-1, 4)
                    if len(bx) != len(f):
                        raise ValueError(f"row {i}: {len(f)} feature rows but {len(bx)} boxes")
                    items.append(({"key": str(i), "feats": f, "boxes": bx, "meta": {}}, []))
                for i, e in zip(kinds["feats"], self.embedder.encode_images(items)):
                    out[i] = _image_out(e)
            if "text" in kinds:
                rows = kinds["text"]
                for i, e in zip(rows, self.embedder.texts([records[i]["text"] for i in rows])):
                    out[i] = _text_out(e)
            if "tree" in kinds:
                caps = []
                for i in kinds["tree"]:
                    t = records[i]["tree"]
                    tree = json.loads(t) if isinstance(t, str) else t
                    trees.validate(tree)
                    caps.append({"tree": tree, "phrases": trees.phrases(tree)})
                for i, e in zip(kinds["tree"], self.embedder.encode_captions(caps)):
                    out[i] = _text_out(e)
        return out


def _image_out(e: dict) -> dict:
    return {"embedding": e["image"].tolist(), "parts": e["regions"].tolist(), "boxes": e["boxes"].tolist(),
            "tokens": None, "tree": None, "spans": None}


def _text_out(e: dict) -> dict:
    return {"embedding": e["sentence"].tolist(), "parts": e["phrases"].tolist(), "boxes": None,
            "tokens": e["tokens"], "tree": json.dumps(e["tree"]), "spans": json.dumps(e["spans"])}


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(Array("double"), "feats"), ColSpec("string", "kind", required=False),
                                         ColSpec(Array(Array("double")), "regions", required=False)]),
                          outputs=Schema([ColSpec("string", "text"), ColSpec("double", "score")]))


class CaptionerPyfunc(mlflow.pyfunc.PythonModel):
    """Registered model: rows {feats: (D,) EfficientNet-Lite0 feature of an image (row 0 of the shards) or a
    region, kind: "caption" (default) | "phrase", regions: optional (R, D) rows a caption attends over (the
    image's feats.npy, row 0 = whole image; default: feats alone)} -> {text, score}; beam search with the
    trained beam size.

        m = mlflow.pyfunc.load_model("models:/densevse-captioner/1")
        m.predict(pd.DataFrame({"feats": [feats[0].tolist()], "kind": ["caption"], "regions": [feats.tolist()]}))
    """

    def load_context(self, context):
        self.captioner = Captioner.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        cap, df = self.captioner, pd.DataFrame(model_input)
        kinds = df["kind"].fillna("caption").tolist() if "kind" in df else ["caption"] * len(df)
        bad = sorted({k for k in kinds if k not in ("caption", "phrase")})
        if bad:
            raise ValueError(f"kind must be 'caption' or 'phrase', got {bad}")
        c = cap.ck["config"]["captioner"]
        out = [None] * len(df)
        for name, kind in (("caption", SENTENCE), ("phrase", cap.phrase_kind)):
            rows = [i for i, k in enumerate(kinds) if k == name]
            if rows:
                feats = np.stack([np.asarray(df["feats"].iloc[i], np.float32) for i in rows])
                images = None
                if name == "caption" and "regions" in df:
                    images = [feats[j:j + 1] if df["regions"].iloc[i] is None
                              else np.asarray(list(df["regions"].iloc[i]), np.float32) for j, i in enumerate(rows)]
                for i, r in zip(rows, cap.describe(feats, kind, c["beam_size"], c["max_len"], images=images,
                                                       no_repeat_ngram=c.get("no_repeat_ngram", 0))):
                    out[i] = r
        return pd.DataFrame({"text": [o[0] for o in out], "score": [o[1] for o in out]})
