"""The description model: training pairs from the shards, Ray Train training, loading, and its MLflow model.

    summary = train_captioner(cfg)      # best epoch -> <output_dir>/models/captioner/best.pt (+ MLflow model)
    cap = Captioner.load(path)          # cap.describe(feats, kind) -> [(text, score)]

Training pairs (one decoder, two kinds of output, see models/mrnn.py):
  * sentence: whole-image feature (row 0 of feats.npy) -> each caption's tokens;
  * phrase: a region's feature -> the noun phrase linked to it. Gold links (synthetic set: caption -> object NP
    token span -> gold box) name a gold box; the region is the shard's proposal (rows 1..) with the highest
    IoU >= 0.5 with it, so this works with gold_boxes regions and with detector proposals alike. Without gold
    links (Flickr8k) there are no phrase pairs; region descriptions then come from the sentence decoder run
    on the region feature (`Captioner.phrase_kind`).

Ray Train runs `captioner_loop` like pipeline/train.py runs the embedding model: cfg.train.num_workers workers
(cfg.train.use_gpu), each reading its rank's shards (pipeline.loader.rank_shards), DDP join for uneven shares,
a checkpoint per epoch, FailureConfig(cfg.train.max_failures). Rank 0 computes the val loss each epoch; the best
epoch (lowest val loss, else the last) is kept.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

from models.mrnn import MRNN, PHRASE, SENTENCE, SPECIALS
from models.vocab import Vocab, normalize

MODEL_NAME = "mrnn"

# ---------------------------------------------------------------- training pairs


def region_phrases(sample: dict, iou: float = 0.5) -> list[tuple[int, list[str]]]:
    """(region row, phrase tokens) of a sample's gold-linked object NPs, deduplicated per region and phrase."""
    from pipeline.loader import _gold_nodes
    from stages.regions import box_iou

    gold = sample["meta"].get("gold") or {}
    gboxes = np.asarray(gold.get("boxes", []), np.float32).reshape(-1, 4)
    props = sample["boxes"][1:]
    if not len(gboxes) or not len(props):
        return []
    ious = box_iou(gboxes, props)                     # (G, R-1)
    out, seen = [], set()
    for c in sample["meta"]["captions"]:
        tree = c["tree"]
        for node, b in _gold_nodes(c, gold):
            if b >= len(gboxes) or ious[b].max() < iou:
                continue
            s, e = tree["spans"][node]
            row, words = 1 + int(ious[b].argmax()), [normalize(t) for t in tree["tokens"][s:e]]
            if (row, tuple(words)) not in seen:
                seen.add((row, tuple(words)))
                out.append((row, words))
    return out


def sample_pairs(sample: dict, with_phrases: bool, max_len: int) -> list[tuple[int, int, list[str]]]:
    """(feature row, kind, tokens) training pairs of one shard sample; captions over max_len tokens are skipped.
    A sentence describes row 0 (the whole image, attending over every row); a phrase its region's row."""
    from pipeline.loader import caption_tokens

    pairs = [(0, SENTENCE, caption_tokens(c)) for c in sample["meta"]["captions"]]
    if with_phrases:
        pairs += [(row, PHRASE, words) for row, words in region_phrases(sample)]
    return [p for p in pairs if 0 < len(p[2]) <= max_len]


def build_vocab(paths, with_phrases: bool, max_len: int, min_count: int = 1) -> Vocab:
    counts: Counter = Counter()
    from pipeline.loader import iter_samples

    for s in iter_samples(paths):
        for _, _, words in sample_pairs(s, with_phrases, max_len):
            counts.update(words)
    return Vocab(SPECIALS + sorted(w for w, n in counts.items() if n >= min_count))


def pad_images(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_i, D) feature arrays -> (N, R_max, D) float tensor and its (N, R_max) mask of real rows."""
    r = max(len(f) for f in images)
    feats = torch.zeros(len(images), r, images[0].shape[1])
    for i, f in enumerate(images):
        feats[i, :len(f)] = torch.from_numpy(np.asarray(f, np.float32))
    return feats, torch.arange(r)[None] < torch.tensor([len(f) for f in images])[:, None]


class Pairs:
    """All pairs of some shards as tensors: each image's feature rows once (float16), and per pair its image,
    row, kind and tokens. A batch gives the pairs' own features plus their attention memory: all rows of the
    image for a sentence, the region's own row for a phrase."""

    def __init__(self, paths, vocab: Vocab, with_phrases: bool, max_len: int):
        from pipeline.loader import iter_samples

        images, img, rows, kinds, toks = [], [], [], [], []
        for s in iter_samples(paths):
            pairs = sample_pairs(s, with_phrases, max_len)
            for row, k, words in pairs:
                img.append(len(images))
                rows.append(row)
                kinds.append(k)
                toks.append([vocab(w) for w in words])
            if pairs:
                images.append(s["feats"])
        self.images, self.mask = pad_images(images) if images else (torch.zeros(0, 1, 1), torch.zeros(0, 1, dtype=torch.bool))
        self.images = self.images.half()
        self.img, self.row = torch.tensor(img, dtype=torch.long), torch.tensor(rows, dtype=torch.long)
        self.kind = torch.tensor(kinds, dtype=torch.long)
        self.tokens = torch.zeros(len(toks), max((len(t) for t in toks), default=1), dtype=torch.long)
        for i, t in enumerate(toks):
            self.tokens[i, :len(t)] = torch.tensor(t)

    def __len__(self) -> int:
        return len(self.kind)

    def batches(self, batch_size: int, seed: int | None = None):
        """(feats (B, D), kind (B,), tokens (B, L), memory (B, R, D), mask (B, R)) batches."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if seed is not None \
            else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            j = order[i:i + batch_size]
            toks = self.tokens[j]
            memory, row, kind = self.images[self.img[j]].float(), self.row[j], self.kind[j]
            own = torch.arange(memory.shape[1])[None] == row[:, None]
            mask = torch.where((kind == SENTENCE)[:, None], self.mask[self.img[j]], own)
            yield memory[torch.arange(len(j)), row], kind, toks[:, :int((toks != 0).sum(1).max())], memory, mask


def build_model(cfg, vocab: Vocab, feat_dim: int) -> MRNN:
    word_init = None
    if cfg.train.word_vectors == "glove-6b-50d":
        from models.vocab import glove_init

        word_init = glove_init(vocab, seed=cfg.train.seed)[0]
    c = cfg.captioner
    return MRNN(len(vocab), feat_dim, hidden_dim=c.hidden_dim, multimodal_dim=c.hidden_dim, cell=c.cell,
                dropout=c.dropout, word_init=word_init, attention=c.attention)


def run_epoch(model, pairs: Pairs, batch_size: int, opt=None, seed: int | None = None, device="cpu",
              grad_clip: float = 2.0) -> tuple[float, int]:
    """One pass (training when opt is given, else evaluation): (mean loss per pair, pairs)."""
    model.train(opt is not None)
    total, n = 0.0, 0
    with contextlib.nullcontext() if opt is not None else torch.no_grad():
        for f, k, t, mem, mask in pairs.batches(batch_size, seed):
            loss = model(f.to(device), k.to(device), t.to(device), mem.to(device), mask.to(device))
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
            total += float(loss.detach()) * len(k)
            n += len(k)
    return total / max(n, 1), n


# ---------------------------------------------------------------- Ray Train


def _storage(cfg) -> Path:
    return (Path(cfg.run.output_dir) / "ray_train").resolve()


def default_checkpoint(cfg) -> Path:
    return Path(cfg.run.output_dir) / "models" / "captioner" / "best.pt"


def train_captioner(cfg) -> dict:
    """Train the captioner on the train shards with Ray Train; returns a summary (also <output_dir>/train-captioner.json)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline import tracking
    from pipeline.loader import iter_samples, shard_paths
    from pipeline.train import REPO, for_workers, init_ray, save_best

    t0 = time.time()
    cfg = for_workers(cfg)
    paths = shard_paths(cfg.shard_dir, "train")
    if not paths:
        raise FileNotFoundError(f"no finished train shards in {cfg.shard_dir}; run `densevse preprocess` first")
    c = cfg.captioner
    vocab = build_vocab(paths, c.region_phrases, c.max_len, c.min_word_count)
    if len(vocab) <= len(SPECIALS):
        raise ValueError(f"the train shards in {cfg.shard_dir} hold no caption of at most {c.max_len} tokens")
    feat_dim = next(iter_samples(paths[:1]))["feats"].shape[1]
    init_ray(cfg)  # first: a Ray that fails to start leaves no empty MLflow run behind
    run_id = None
    if cfg.mlflow.tracking_uri:
        run_id = tracking.start_run(cfg)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.mlflow.tracking_uri)
        client.set_tag(run_id, "mlflow.runName", f"{cfg.run.name}-captioner")
        client.set_tag(run_id, "model", MODEL_NAME)

    use_gpu = cfg.train.use_gpu
    trainer = TorchTrainer(
        captioner_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "words": vocab.words, "feat_dim": feat_dim,
                           "mlflow_run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=f"{cfg.run.name}-captioner-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(_storage(cfg)),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             worker_runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}),
    )
    result = trainer.fit()
    best_path = default_checkpoint(cfg)
    history, best_epoch = save_best(result, best_path, lambda h: -h.get("val_loss", h["train_loss"]))
    summary = {"model": MODEL_NAME, "epochs": len(history), "best_epoch": best_epoch, "vocab": len(vocab),
               "best": next(h for h in history if h["epoch"] == best_epoch), "history": history,
               "best_model": str(best_path), "seconds": round(time.time() - t0, 1), "mlflow_run_id": run_id}
    if run_id:
        summary["registered_version"] = register_model(cfg, run_id, history, best_path)
    (cfg.run.output_dir / "train-captioner.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def captioner_loop(config: dict) -> None:
    """One Ray Train worker: its rank's pairs in memory, Adam, a checkpoint (rank 0) every epoch."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipeline import tracking
    from pipeline.config import parse_config
    from pipeline.loader import rank_shards, shard_paths

    cfg = parse_config(config["cfg"])
    c, tc = cfg.captioner, cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    torch.manual_seed(tc.seed)
    vocab = Vocab(config["words"])
    state, restored = None, ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=False)
    core = MRNN(**state["hparams"]) if state else build_model(cfg, vocab, config["feat_dim"])
    if state:
        core.load_state_dict(state["state_dict"])
    core.to(device)
    model = ray.train.torch.prepare_model(core, move_to_device=device) if world > 1 else core
    opt = torch.optim.Adam(core.parameters(), lr=c.lr)
    if state:
        opt.load_state_dict(state["optimizer"])
    history = state["history"] if state else []
    run_id = config["mlflow_run_id"]

    all_train = shard_paths(cfg.shard_dir, "train")
    train = Pairs(rank_shards(all_train, rank, world), vocab, c.region_phrases, c.max_len)
    val_paths = shard_paths(cfg.shard_dir, "val")
    val = Pairs(val_paths, vocab, c.region_phrases, c.max_len) if rank == 0 and val_paths else None
    for epoch in range(state["epoch"] + 1 if state else 0, c.epochs):
        t = time.time()
        with model.join() if world > 1 else contextlib.nullcontext():
            loss, n = run_epoch(model, train, c.batch_size, opt, seed=tc.seed * 1000 + epoch, device=device,
                                grad_clip=tc.grad_clip)
        sums = torch.tensor([loss * n, n], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        if sums[1] == 0:
            raise RuntimeError(f"epoch {epoch}: no captioner training pairs on {world} worker(s) in {cfg.shard_dir}")
        metrics = {"epoch": epoch, "train_loss": float(sums[0] / sums[1]), "train_pairs": int(sums[1]),
                   "epoch_seconds": time.time() - t}
        checkpoint = None
        if rank == 0:
            if val is not None and len(val):
                metrics["val_loss"] = run_epoch(core, val, 256, device=device)[0]
            history.append(metrics)
            if run_id and cfg.mlflow.tracking_uri:
                tracking.log_epoch(cfg.mlflow.tracking_uri, run_id, metrics, step=epoch)
            tmp = tempfile.mkdtemp(prefix="densevse-captioner-")
            torch.save({"model_name": MODEL_NAME, "hparams": core.hparams, "state_dict": core.state_dict(),
                        "optimizer": opt.state_dict(), "vocab": vocab.words, "epoch": epoch, "history": history,
                        "phrase_pairs": int((train.kind == PHRASE).sum()), "mlflow_run_id": run_id,
                        "config": config["cfg"]}, Path(tmp) / "model.pt")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)


# ---------------------------------------------------------------- the trained model


class Captioner:
    """A trained checkpoint, ready to write descriptions of feature vectors."""

    def __init__(self, model: MRNN, vocab: Vocab, ck: dict, device="cpu"):
        self.model, self.vocab, self.ck, self.device = model.eval(), vocab, ck, device
        # Without phrase training pairs the PHRASE kind is untrained: regions get the sentence decoder.
        self.phrase_kind = PHRASE if ck.get("phrase_pairs", 0) > 0 else SENTENCE

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "Captioner":
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt" if (path / "model.pt").is_file() else path / "models" / "captioner" / "best.pt"
        if not path.is_file():
            raise FileNotFoundError(f"no captioner checkpoint at {path} (train one: `densevse captioner train`)")
        ck = torch.load(path, map_location=device, weights_only=False)
        model = MRNN(**ck["hparams"]).to(device)
        model.load_state_dict(ck["state_dict"])
        return cls(model, Vocab(ck["vocab"]), ck, device)

    def describe(self, feats, kind: int, beam: int = 7, max_len: int = 24, batch: int = 256,
                 images: list | None = None, no_repeat_ngram: int = 3) -> list[tuple[str, float]]:
        """(text, confidence) per feature row; confidence = exp(mean log-prob per word, EOS included).
        `images`, one (R, D) array per row: what each row's description attends over (default: the row)."""
        d = self.model.hparams["feat_dim"]
        feats = torch.as_tensor(np.asarray(feats, np.float32)).reshape(-1, d)
        if images is not None:
            images = [np.asarray(f, np.float32) for f in images]
            bad = [f.shape for f in images if f.ndim != 2 or len(f) == 0 or f.shape[1] != d]
            if len(images) != len(feats) or bad:
                raise ValueError(f"images must be one (R, {d}) array with R >= 1 per feature row "
                                 f"({len(feats)}); got {len(images)} arrays, bad shapes {bad[:3]}")
        out = []
        for i in range(0, len(feats), batch):
            f = feats[i:i + batch].to(self.device)
            k = torch.full((len(f),), kind, dtype=torch.long, device=self.device)
            mem = mask = None
            if images is not None:
                mem, mask = (x.to(self.device) for x in pad_images(images[i:i + batch]))
            for ids, logp in self.model.beam_search(f, k, beam=beam, max_len=max_len, memory=mem, mask=mask,
                                                    no_repeat_ngram=no_repeat_ngram):
                out.append((" ".join(self.vocab.words[t] for t in ids), float(np.exp(logp / (len(ids) + 1)))))
        return out

    def caption(self, images: list, beam: int = 7, max_len: int = 24, no_repeat_ngram: int = 3) -> list[tuple[str, float]]:
        """Whole-image (text, confidence) per image, from its (R, D) feature rows (row 0 = the whole image)."""
        return self.describe(np.stack([np.asarray(f)[0] for f in images]), SENTENCE, beam, max_len, images=images,
                             no_repeat_ngram=no_repeat_ngram)


# ---------------------------------------------------------------- MLflow


def register_model(cfg, run_id: str, history: list[dict], best_path: Path) -> int | None:
    """Loss curve + the best checkpoint as a pyfunc model registered as cfg.captioner.registered_model."""
    import matplotlib

    matplotlib.use("Agg")
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import REPO, curves

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    for name, fig in curves(history).items():
        client.log_figure(run_id, fig, f"plots/{name}.png")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CaptionerPyfunc(), artifacts={"checkpoint": str(best_path)},
            signature=pyfunc_signature(), registered_model_name=cfg.captioner.registered_model,
            code_paths=[str(REPO / "models"), str(REPO / "pipeline")],
            pip_requirements=["torch", "numpy", "pandas", "mlflow"])
        mlflow.set_tag("best_model", str(best_path))
    return info.registered_model_version


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

