"""Searching an index (`densevse search`, the search page): text -> images, image -> captions, and
phrase -> regions across every photo, which a whole-image index cannot answer.

    ix = Index.open("runs/default/index")              # the model: the index's own unless given
    ix.images("a red circle left of a blue square", k=5)    -> [{rank, score, key, image, source, captions}]
    ix.captions(open("photo.jpg", "rb").read(), k=5)       -> [{rank, score, key, image, text}]
    ix.regions("a blue square", k=5)                        -> [{rank, score, key, image, box, source}]
    ix.similar(photo_bytes, k=5)                            -> [{rank, score, key, image, source}]

A query is embedded by the index's model, through the same stages as preprocessing (pipeline/serving/embedder.py).
Scores are cosine similarities of the embeddings (HM-LSTM's sentence-image score adds a phrase-region term
over the image's regions; the index ranks by the vectors alone, as every kNN index does). A model other than
the index's (other weights or dimension) is refused when the index is opened, before any search.

An index names its model as data, never as something to run: opened without a model, it loads the checkpoint
recorded in index.json weights-only, and only when the file still has the recorded sha256. An index built with
an MLflow URI (loading one runs the model's code) is opened only with that URI given again by the user
(`--model`); stage model files come from the caller's `stages` (embedder.trusted_stages).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from densevse.pipeline import storage
from densevse.pipeline.errors import ModelMismatch
from densevse.pipeline.search import vectors
from densevse.pipeline.search.index import INDEX_JSON, KINDS, read_jpeg


class Index:
    def __init__(self, root: storage.Location, info: dict, embedder):
        self.root, self.info, self.embedder = root, info, embedder
        self.meta = _table(root / "metadata" / "metadata_0.parquet")
        self.captions_t = _table(root / "captions.parquet")
        self.regions_t = _table(root / "regions.parquet")
        self.image_captions: dict[int, list[str]] = {}
        for c in self.captions_t:
            self.image_captions.setdefault(c["image"], []).append(c["text"])
        self._faiss: dict = {}

    @classmethod
    def open(cls, root, model: str | None = None, embedder=None, stages=None) -> Index:
        """Open the index at `root` (a location: local or in object storage) with its own checkpoint, or `model`
        (a checkpoint path or an MLflow URI the user gave) / `embedder`, which must be the same model:
        ModelMismatch otherwise. `stages`: the caller's stage config, where query stages take their model files
        from."""
        from densevse.pipeline.serving import embedder as emb

        root = storage.location(root)
        if not (root / INDEX_JSON).is_file():
            raise FileNotFoundError(f"no index at {root} (no {INDEX_JSON}; build one with `densevse index`)")
        info = json.loads((root / INDEX_JSON).read_text())
        built = info["model"]
        if embedder is None:
            embedder = emb.load(model, stages) if model else own_model(built, root, stages)
        check_model(built, embedder.identity)
        return cls(root, info, embedder)

    def _index(self, kind: str):
        if kind not in self._faiss:
            path = self.root / f"{kind}.faiss"
            if not path.is_file():
                raise LookupError(f"the index at {self.root} holds no {kind} vectors")
            self._faiss[kind] = vectors.load(path)
        return self._faiss[kind]

    def _search(self, kind: str, query: np.ndarray, k: int):
        scores, ids = vectors.search(self._index(kind), np.asarray(query, np.float32)[None], k)
        return [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def _image(self, i: int) -> dict:
        m = self.meta[i]
        return {"key": m["key"], "image": i, "source": m["source"], "split": m["split"],
                "width": m["width"], "height": m["height"]}

    # ---- queries
    def images(self, text: str, k: int = 10) -> list[dict]:
        """Images for a sentence, with their captions."""
        q = self.embedder.texts([text])[0]["sentence"]
        return [{"rank": r, "score": s, **self._image(i), "captions": self.image_captions.get(i, [])}
                for r, (s, i) in enumerate(self._search("image", q, k), 1)]

    def similar(self, image, k: int = 10) -> list[dict]:
        """Indexed images like a photo (bytes or a path): image vector against image vectors."""
        q = self.embedder.images([image])[0]["image"]
        return [{"rank": r, "score": s, **self._image(i)} for r, (s, i) in enumerate(self._search("image", q, k), 1)]

    def captions(self, image, k: int = 10) -> list[dict]:
        """Captions for an image (bytes or a path)."""
        q = self.embedder.images([image])[0]["image"]
        out = []
        for r, (s, j) in enumerate(self._search("text", q, k), 1):
            c = self.captions_t[j]
            out.append({"rank": r, "score": s, **self._image(c["image"]), "text": c["text"]})
        return out

    def regions(self, phrase: str, k: int = 10) -> list[dict]:
        """Regions of any image for a phrase: the phrase's vector (its tree's root) against every region."""
        q = self.embedder.texts([phrase])[0]["sentence"]
        out = []
        for r, (s, j) in enumerate(self._search("region", q, k), 1):
            g = self.regions_t[j]
            out.append({"rank": r, "score": s, **self._image(g["image"]),
                        "box": [g["x0"], g["y0"], g["x1"], g["y1"]]})
        return out

    def jpeg(self, image: int) -> bytes:
        """An indexed image's JPEG, read from its shard."""
        m = self.meta[image]
        if not m["jpg_size"]:
            raise LookupError(f"image {m['key']} has no JPEG in its shard")
        return read_jpeg(m["shard"], m["jpg_offset"], m["jpg_size"])


def own_model(built: dict, root, stages=None):
    """The Embedder of the checkpoint index.json records, loaded weights-only once its bytes match the recorded
    sha256; an MLflow URI (or a path without a sha256) is never loaded from an index's own file."""
    from densevse.models.checkpoint import ChecksumMismatch
    from densevse.pipeline.serving.embedder import Embedder, checkpoint_location

    path = built.get("checkpoint") or built.get("source")  # "source": index.json written before checkpoint/sha256
    file = checkpoint_location(path) if path else None  # a file, local or in object storage: data, not code
    if file is None:
        raise ModelMismatch(f"the index at {root} was built with {path or 'an unnamed model'}; an index does not "
                            f"load models by itself: search it with --model <that model> if you trust it")
    if not built.get("sha256"):
        raise ModelMismatch(f"the index at {root} records {path} without its sha256: search it with --model "
                            f"{path} if you trust that file, or rebuild the index")
    if not file.is_file():
        raise FileNotFoundError(f"the index at {root} was built with {path}, which is gone: pass --model")
    try:
        return Embedder.from_checkpoint(file, stages=stages, sha256=built["sha256"])
    except ChecksumMismatch as e:
        raise ModelMismatch(f"the index at {root} was built with another {path}: {e}; rebuild the index, or "
                            f"search it with --model") from None


def _table(path: storage.Location) -> list[dict]:
    with path.open("rb") as f:
        return pq.read_table(f).to_pylist()


def _name(identity: dict) -> str:
    return identity.get("checkpoint") or identity.get("source") or identity.get("model", "?")


def check_model(built: dict, query: dict) -> None:
    """ModelMismatch unless the query model has the index's dimension and (when both are known) weights."""
    if int(built["dim"]) != int(query["dim"]):
        raise ModelMismatch(f"the index holds {built['dim']}-d vectors of {_name(built)}; the query model "
                            f"{_name(query)} embeds in {query['dim']} dimensions")
    if built.get("sha256") and query.get("sha256") and built["sha256"] != query["sha256"]:
        raise ModelMismatch(f"the index was built with {_name(built)} (checkpoint sha256 "
                            f"{built['sha256'][:12]}), not with {_name(query)} ({query['sha256'][:12]}): "
                            f"rebuild it with `densevse index --model ...`, or search with its own model")


def draw(hits: list[dict], index: Index, out_dir: str | Path, name: str) -> list[Path]:
    """One PNG per hit (the image, the hit's box if any, score and caption) under out_dir."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for h in hits:
        img = Image.open(io.BytesIO(index.jpeg(h["image"]))).convert("RGB")
        fig, ax = plt.subplots(figsize=(4, 4.4))
        ax.imshow(img)
        if "box" in h:
            x0, y0, x1, y1 = h["box"]
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=2.5))
        ax.set_title(f"#{h['rank']} {h['key']}  {h['score']:.3f}\n{h.get('text', '')}"[:120], fontsize=8)
        ax.axis("off")
        p = out_dir / f"{name}-{h['rank']:02d}.png"
        fig.savefig(p, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


__all__ = ["Index", "ModelMismatch", "check_model", "draw", "KINDS"]
