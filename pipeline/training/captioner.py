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
(cfg.train.use_gpu), each reading its rank's shards (pipeline.training.data.rank_shards), DDP join for uneven shares,
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

import numpy as np
import torch

from models.batch import caption_tokens, gold_nodes
from models.captioner import build_model, pad_images
from models.checkpoint import load_checkpoint
from models.metrics import box_iou
from models.mrnn import MRNN, PHRASE, SENTENCE, SPECIALS
from models.vocab import Vocab, normalize
from pipeline.training.data import iter_samples

MODEL_NAME = "mrnn"

# ---------------------------------------------------------------- training pairs


def region_phrases(sample: dict, iou: float = 0.5) -> list[tuple[int, list[str]]]:
    """(region row, phrase tokens) of a sample's gold-linked object NPs, deduplicated per region and phrase."""
    gold = sample["meta"].get("gold") or {}
    gboxes = np.asarray(gold.get("boxes", []), np.float32).reshape(-1, 4)
    props = sample["boxes"][1:]
    if not len(gboxes) or not len(props):
        return []
    ious = box_iou(gboxes, props)                     # (G, R-1)
    out, seen = [], set()
    for c in sample["meta"]["captions"]:
        tree = c["tree"]
        for node, b in gold_nodes(c, gold):
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
    pairs = [(0, SENTENCE, caption_tokens(c)) for c in sample["meta"]["captions"]]
    if with_phrases:
        pairs += [(row, PHRASE, words) for row, words in region_phrases(sample)]
    return [p for p in pairs if 0 < len(p[2]) <= max_len]


def build_vocab(paths, with_phrases: bool, max_len: int, min_count: int = 1) -> Vocab:
    counts: Counter = Counter()
    for s in iter_samples(paths):
        for _, _, words in sample_pairs(s, with_phrases, max_len):
            counts.update(words)
    return Vocab(SPECIALS + sorted(w for w, n in counts.items() if n >= min_count))


class Pairs:
    """All pairs of some shards as tensors: each image's feature rows once (float16), and per pair its image,
    row, kind and tokens. A batch gives the pairs' own features plus their attention memory: all rows of the
    image for a sentence, the region's own row for a phrase."""

    def __init__(self, paths, vocab: Vocab, with_phrases: bool, max_len: int):
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
    from pipeline.preprocess.shards import shard_paths
    from pipeline.raylocal import REPO, init_ray
    from pipeline.training.embedding import for_workers, save_best

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
        summary["registered_version"] = tracking.register_captioner(cfg, run_id, history, best_path)
    (cfg.run.output_dir / "train-captioner.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def captioner_loop(config: dict) -> None:
    """One Ray Train worker: its rank's pairs in memory, Adam, a checkpoint (rank 0) every epoch."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipeline import tracking
    from pipeline.config import parse_config
    from pipeline.training.data import rank_shards
    from pipeline.preprocess.shards import shard_paths

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
            state = load_checkpoint(Path(d) / "model.pt")
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


# ---------------------------------------------------------------- MLflow


