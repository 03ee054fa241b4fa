"""The embedding model (train.model: hmlstm, or the vse / dvsa baselines) trained by the shared Ray Train loop.

    summary = train(cfg)               # pipeline/training/tasks.py: the task named cfg.train.model
    summary = train(cfg, resume=True)  # continue from the latest checkpoint of cfg.train.model

The driver builds the vocabularies (GloVe-initialised word vectors) from the train shards once (a resumed run
keeps its checkpoint's). pipeline/training/loop.py runs the workers (DDP, restarts, checkpoints, MLflow); each
rank streams its own shards' pairs (pipeline.shardset.rank_shards), so every training pair is seen exactly
once per epoch by exactly one rank; bf16 autocast on GPU only. `train.batch_size` is per worker: it is also the
pool of in-batch negatives of the ranking loss. Rank 0 evaluates retrieval on the val split each epoch; the best
epoch (by val rsum, else the lowest train loss) goes to best.pt (trained.best_path) and is registered in
MLflow as cfg.mlflow.registered_model; train.patience stops early when val rsum stops improving. Batches are
collated on a prefetch thread while the model trains (train.prefetch; compute_share per epoch).
"""
from __future__ import annotations

import contextlib

import torch

from densevse.pipeline.errors import ConfigError
from densevse.pipeline.training.loop import Task


def hardest_negatives_at(tc, epoch: int) -> bool:
    """Whether epoch `epoch` ranks against the hardest negative (VSE++) or sums over all: hardest ones only after
    `train.hardest_negative_warmup` summed epochs, since from a random start they collapse every embedding."""
    return tc.hardest_negative and epoch >= tc.hardest_negative_warmup


class EmbeddingTask(Task):
    """The task of every embedding model: its name is the model's (train.model), which names its outputs."""

    no_pairs_hint = " (every caption longer than train.max_tokens?)"

    def __init__(self, cfg, model: str | None = None):
        """model: the registered task's name; it trains train.model, whose config (MLflow name, paths) it uses."""
        if model is not None and model != cfg.train.model:
            raise ConfigError(f"task {model!r} trains train.model, which is {cfg.train.model!r} in this config "
                              f"(set -s train.model={model})")
        self.name = self.model_name = cfg.train.model
        self.epochs, self.lr = cfg.train.epochs, cfg.train.lr
        self.patience, self.prefetch_depth = cfg.train.patience, cfg.train.prefetch

    def prepare(self, cfg, paths: list, state: dict | None) -> dict:
        from densevse.models.vocab import glove_init
        from densevse.pipeline.shardset import iter_samples, load_stats, shard_of
        from densevse.pipeline.training.data import build_vocabs

        stats = load_stats(cfg.shard_dir, [shard_of(p) for p in paths])
        n_samples, n_captions = sum(st["n_ok"] for st in stats), sum(st["n_captions"] for st in stats)
        if n_captions == 0 or n_samples < cfg.train.num_workers:
            raise ValueError(f"the {len(paths)} train shards in {cfg.shard_dir} hold {n_samples} samples and "
                             f"{n_captions} captions: too little for {cfg.train.num_workers} worker(s) to train on")
        if state is not None:
            self.words, self.label_words, self.word_init = state["vocab"], state["labels"], None
        else:
            vocab, label_vocab = build_vocabs(paths)
            self.words, self.label_words = vocab.words, label_vocab.words
            self.word_init = glove_init(vocab)[0] if cfg.train.word_vectors == "glove-6b-50d" else None
        self.feat_dim = next(iter_samples(paths[:1]))["feats"].shape[1]
        return {"vocab": len(self.words)}

    def setup(self, cfg, train_paths: list, val_paths: list, device) -> None:
        from densevse.models.vocab import Vocab

        self.tc, self.eval_cfg, self.device = cfg.train, cfg.eval, device
        self.train_paths, self.val_paths = train_paths, val_paths
        self.vocab, self.labels = Vocab(self.words), Vocab(self.label_words)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def make_model(self, hparams: dict | None) -> torch.nn.Module:
        from densevse.models import new_embedding_model, rebuild

        if hparams is not None:
            return rebuild(self.model_name, hparams)
        return new_embedding_model(self.model_name, self.tc, vocab_size=len(self.vocab), n_labels=len(self.labels),
                                   feat_dim=self.feat_dim, word_init=self.word_init)

    def train_epoch(self, model, core, opt, epoch: int) -> tuple[dict[str, float], int]:
        from densevse.models.batch import collate
        from densevse.models.losses import embedding_loss
        from densevse.pipeline.training.data import batched_pairs, iter_pairs

        tc = self.tc
        sums, pairs = {"loss": 0.0, "loss_sentence": 0.0, "loss_phrase": 0.0}, 0
        pairs_it = iter_pairs(self.train_paths, epoch, tc.seed, tc.max_tokens)
        tree = getattr(core, "caption_tree", "parse")
        hardest = hardest_negatives_at(tc, epoch)
        batches = (collate(items, self.vocab, self.labels, tree)  # on the prefetch thread, while the model trains
                   for items in batched_pairs(pairs_it, tc.batch_size))
        for b in self.batches(batches):
            b = b.to(self.device)
            with self.amp:
                img, txt = model(b)
                loss, parts = embedding_loss(core, _float32(img), _float32(txt), b, tc.margin, hardest,
                                             tc.phrase_loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(core.parameters(), tc.grad_clip)
            opt.step()
            n = len(b.caption_image)
            sums["loss"] += float(loss.detach()) * n
            sums["loss_sentence"] += float(parts["loss_sentence"]) * n
            sums["loss_phrase"] += float(parts.get("loss_phrase", 0.0)) * n
            pairs += n
        return sums, pairs

    def evaluate(self, core) -> dict:
        from densevse.pipeline.evaluation.retrieval import evaluate_model

        if not self.val_paths:
            return {}
        e = self.eval_cfg
        val = evaluate_model(core, self.vocab, self.labels, self.val_paths, e.ks, e.captions_per_image,
                             device=self.device)
        return {f"val_{k}": v for k, v in val.items() if isinstance(v, float)}

    def checkpoint_extra(self) -> dict:
        return {"vocab": self.vocab.words, "labels": self.labels.words}

    def best_score(self, entry: dict) -> float:
        return entry.get("val_rsum", -entry["train_loss"])

    def register(self, cfg, run_id: str, history: list[dict], best) -> int | None:
        from densevse.pipeline.tracking import registry

        return registry.finish_run(cfg, run_id, history, best, score=max(map(self.best_score, history)))


def _float32(out: dict) -> dict:
    """The model's outputs in float32 for the loss (bf16 under autocast)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
