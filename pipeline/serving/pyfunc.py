"""The registered MLflow model: a trained checkpoint behind mlflow.pyfunc, embedding images and sentences.

Input: a DataFrame, one row per item: an image (feats and boxes) or a sentence (tree)
    feats  list[list[float]]  (R, D) region features of an image, row 0 = the whole image (as in the shards)
    boxes  list[list[float]]  (R, 4) their xyxy pixel boxes, row 0 = the whole image (as in the shards)
    tree   str                a caption's constituency tree as JSON (pipeline/trees.py format)
Output: embedding (list[float]: the image / sentence vector) and parts (list[list[float]]: the region vectors
of an image, rows 1.. of feats; or the phrase vectors of a sentence, in trees.phrases(tree) order).

    m = mlflow.pyfunc.load_model("models:/densevse-hmlstm/1")
    m.predict(pd.DataFrame({"feats": [feats.tolist(), None], "boxes": [boxes.tolist(), None],
                            "tree": [None, json.dumps(tree)]}))
"""
from __future__ import annotations

import json
import math

import mlflow.pyfunc
import numpy as np

from models.captioner import Captioner
from models.mrnn import SENTENCE


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec(Array(Array("double")), "feats", required=False),
                     ColSpec(Array(Array("double")), "boxes", required=False),
                     ColSpec("string", "tree", required=False)])
    outputs = Schema([ColSpec(Array("double"), "embedding"), ColSpec(Array(Array("double")), "parts")])
    return ModelSignature(inputs=inputs, outputs=outputs)


class EmbeddingPyfunc(mlflow.pyfunc.PythonModel):
    """mlflow.pyfunc wrapper of a trained checkpoint: rows of `feats` or `tree` -> embeddings."""

    def load_context(self, context):
        from models.checkpoint import load_model

        self.model, self.vocab, self.labels, _ = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd
        import torch

        from models import trees
        from models.batch import collate

        df = pd.DataFrame(model_input)
        out: list = [None] * len(df)

        def get(row, col):
            v = row.get(col) if col in row else None
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

        records = df.to_dict("records")
        img_rows = [(i, get(r, "feats"), get(r, "boxes")) for i, r in enumerate(records) if get(r, "feats") is not None]
        txt_rows = [(i, get(r, "tree")) for i, r in enumerate(records) if get(r, "tree") is not None]
        with torch.no_grad():
            if img_rows:
                items = []
                for i, f, bx in img_rows:
                    f = np.asarray([np.asarray(x, np.float32) for x in f], np.float32)
                    if bx is None:
                        raise ValueError(f"row {i}: an image needs 'boxes' (R, 4) along with 'feats'")
                    bx = np.asarray([np.asarray(x, np.float32) for x in bx], np.float32).reshape(-1, 4)
                    if len(bx) != len(f):
                        raise ValueError(f"row {i}: {len(f)} feature rows but {len(bx)} boxes")
                    items.append(({"key": str(i), "feats": f, "boxes": bx, "meta": {}}, []))
                b = collate(items, self.vocab, self.labels)
                e = self.model.encode_images(b)
                for j, (i, _, _) in enumerate(img_rows):
                    n = int(b.valid[j].sum())
                    out[i] = (e["image"][j].tolist(), e["regions"][j, 1:n].tolist())
            if txt_rows:
                caps = []
                for k, (i, t) in enumerate(txt_rows):
                    tree = json.loads(t) if isinstance(t, str) else t
                    trees.validate(tree)
                    caps.append({"index": k, "text": " ".join(tree["tokens"]), "tree": tree,
                                 "phrases": trees.phrases(tree)})
                dim = self.model.hparams["feat_dim"]
                dummy = {"key": "text", "feats": np.zeros((1, dim), np.float32),
                         "boxes": np.zeros((1, 4), np.float32), "meta": {}}
                b = collate([(dummy, caps)], self.vocab, self.labels)
                e = self.model.encode_texts(b)
                for k, (i, _) in enumerate(txt_rows):
                    out[i] = (e["sentence"][k].tolist(), e["phrases"][b.phrase_caption == k].tolist())
        missing = [i for i, o in enumerate(out) if o is None]
        if missing:
            raise ValueError(f"rows {missing[:5]} have neither 'feats' nor 'tree'")
        return pd.DataFrame({"embedding": [o[0] for o in out], "parts": [o[1] for o in out]})


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
