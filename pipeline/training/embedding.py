"""Distributed training on Ray Train.

    summary = train(cfg)               # fresh run
    summary = train(cfg, resume=True)  # continue from the latest checkpoint of cfg.train.model

The driver builds the vocabularies (GloVe-initialised word vectors) from the train shards once, then a
TorchTrainer runs `train_loop` on cfg.train.num_workers workers (DDP over gloo on CPU, NCCL on GPU; bf16
autocast on GPU only). Each rank reads its own shards (rank r: shards r, r+W, ...; with fewer shards than ranks,
every W-th sample of each), so every training pair is seen exactly once per epoch by exactly one rank; uneven
shares are handled by DDP's join(). Workers get absolute paths (they run in Ray's own working directory), and an
epoch with no training pairs is an error, not a zero loss.
`train.batch_size` is per worker: it is also the pool of in-batch negatives of the ranking loss.

Every epoch rank 0 evaluates retrieval on the val split, logs to MLflow and reports a checkpoint (model,
optimizer, vocabularies, history). A crashed worker group restarts from the latest checkpoint
(FailureConfig(max_failures)); `resume=True` restarts a stopped run the same way. Afterwards the best epoch
(by val rsum) is copied to <output_dir>/models/<model>/best.pt, and logged/registered in MLflow.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint
from pipeline.raylocal import REPO, init_ray  # noqa: F401 (re-exported for captioner)


def _storage(cfg) -> Path:
    return (Path(cfg.run.output_dir) / "ray_train").resolve()


def latest_checkpoint(cfg) -> Path | None:
    """The newest model.pt reported by any earlier run of cfg.train.model under this output dir."""
    found = sorted(_storage(cfg).glob(f"{cfg.run.name}-{cfg.train.model}-*/checkpoint_*/model.pt"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def for_workers(cfg):
    """A copy of cfg with absolute paths: Ray Train workers run in another directory, so a relative shard dir,
    output dir or sqlite/file tracking URI would point somewhere else there (an empty MLflow store, say)."""
    from pipeline.tracking import absolute_uri

    cfg = cfg.model_copy(deep=True)
    cfg.shards.dir = Path(cfg.shard_dir).resolve()
    cfg.run.output_dir = Path(cfg.run.output_dir).resolve()
    cfg.mlflow.tracking_uri = absolute_uri(cfg.mlflow.tracking_uri)
    return cfg


def train(cfg, resume: bool = False) -> dict:
    from models.vocab import glove_init
    from pipeline import tracking
    from pipeline.training.data import build_vocabs, iter_samples
    from pipeline.preprocess.shards import shard_paths
    from pipeline.preprocess.shards import load_stats

    t0 = time.time()
    cfg = for_workers(cfg)
    paths = shard_paths(cfg.shard_dir, "train")
    if not paths:
        raise FileNotFoundError(f"no finished train shards in {cfg.shard_dir}; run `densevse preprocess` first")
    stats = load_stats(cfg.shard_dir, [p.stem for p in paths])
    n_samples, n_captions = sum(st["n_ok"] for st in stats), sum(st["n_captions"] for st in stats)
    if n_captions == 0 or n_samples < cfg.train.num_workers:
        raise ValueError(f"the {len(paths)} train shards in {cfg.shard_dir} hold {n_samples} samples and {n_captions} "
                         f"captions: too little for {cfg.train.num_workers} worker(s) to train on")
    resume_from = latest_checkpoint(cfg) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint of {cfg.train.model} under {_storage(cfg)}")
    if resume_from is not None:
        ck = load_checkpoint(resume_from / "model.pt")
        words, labels, word_init, run_id = ck["vocab"], ck["labels"], None, ck.get("mlflow_run_id")
    else:
        vocab, label_vocab = build_vocabs(paths)
        words, labels, run_id = vocab.words, label_vocab.words, None
        word_init = glove_init(vocab)[0] if cfg.train.word_vectors == "glove-6b-50d" else None
    feat_dim = next(iter_samples(paths[:1]))["feats"].shape[1]
    if cfg.mlflow.tracking_uri and run_id is None:
        run_id = tracking.start_run(cfg)

    try:
        result = _fit(cfg, words, labels, word_init, feat_dim, run_id, resume_from)
    except BaseException:
        if run_id:  # a failed job shows as FAILED in MLflow, not as a run forever RUNNING
            tracking.end_run(cfg.mlflow.tracking_uri, run_id, "FAILED")
        raise
    best_path = Path(cfg.run.output_dir) / "models" / cfg.train.model / "best.pt"
    history, best_epoch = save_best(result, best_path, lambda h: h.get("val_rsum", -h["train_loss"]))
    summary = {"model": cfg.train.model, "epochs": len(history), "best_epoch": best_epoch,
               "best": next(h for h in history if h["epoch"] == best_epoch), "history": history,
               "checkpoint": result.checkpoint.path, "best_model": str(best_path),
               "seconds": round(time.time() - t0, 1), "mlflow_run_id": run_id}
    if cfg.mlflow.tracking_uri:
        summary["registered_version"] = tracking.finish_run(cfg, run_id, history, best_path)
    (Path(cfg.run.output_dir) / f"train-{cfg.train.model}.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def save_best(result, best_path: Path, score) -> tuple[list[dict], int]:
    """Copy the best epoch's checkpoint (highest `score(history entry)`), without optimizer state, to best_path.

    The history comes from the last checkpoint, which carries every epoch's metrics (resumed runs included)."""
    with result.checkpoint.as_directory() as d:
        history = load_checkpoint(Path(d) / "model.pt")["history"]
    best_epoch = max(history, key=score)["epoch"]
    best_path.parent.mkdir(parents=True, exist_ok=True)
    for ckpt, _ in result.best_checkpoints:
        with ckpt.as_directory() as d:
            ck = load_checkpoint(Path(d) / "model.pt")
        if ck["epoch"] == best_epoch:
            ck.pop("optimizer", None)
            torch.save(ck, best_path)
    return history, best_epoch


def _fit(cfg, words, labels, word_init, feat_dim, run_id, resume_from):
    """Start Ray (see init_ray) and run the TorchTrainer; returns its Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    use_gpu = cfg.train.use_gpu
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "words": words, "labels": labels,
                           "word_init": word_init, "feat_dim": feat_dim, "mlflow_run_id": run_id,
                           "resume_from": str(resume_from) if resume_from else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=f"{cfg.run.name}-{cfg.train.model}-{stamp}", storage_path=str(_storage(cfg)),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             worker_runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}),
    )
    return trainer.fit()


def train_loop(config: dict) -> None:
    """One Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from models import build_model, rebuild
    from models.losses import embedding_loss
    from models.vocab import Vocab
    from pipeline import tracking
    from pipeline.config import parse_config
    from pipeline.evaluation.retrieval import evaluate_model
    from pipeline.training.data import batched_pairs, iter_pairs, rank_shards
    from models.batch import collate
    from pipeline.preprocess.shards import shard_paths

    cfg = parse_config(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    torch.manual_seed(tc.seed)
    vocab, labels = Vocab(config["words"]), Vocab(config["labels"])

    # Restore: a restarted worker group gets Ray's latest checkpoint; --resume passes one explicitly.
    state, restored = None, ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = load_checkpoint(Path(d) / "model.pt")
    elif config["resume_from"]:
        state = load_checkpoint(Path(config["resume_from"]) / "model.pt")
    if state is not None:
        model = rebuild(state["model_name"], state["hparams"])
        model.load_state_dict(state["state_dict"])
    else:
        model = build_model(tc.model, tc, vocab_size=len(vocab), n_labels=len(labels),
                            feat_dim=config["feat_dim"], word_init=config["word_init"])
    core = model.to(device)
    model = ray.train.torch.prepare_model(core, move_to_device=device) if world > 1 else core
    opt = torch.optim.Adam(core.parameters(), lr=tc.lr)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    start = state["epoch"] + 1 if state is not None else 0
    history = state["history"] if state is not None else []
    run_id = state.get("mlflow_run_id") if state is not None else config["mlflow_run_id"]
    run_id = run_id or config["mlflow_run_id"]

    all_train = shard_paths(cfg.shard_dir, "train")
    if not all_train:
        raise FileNotFoundError(f"worker {rank}: no train shards in {cfg.shard_dir}")
    train_paths = rank_shards(all_train, rank, world)
    val_paths = shard_paths(cfg.shard_dir, "val")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    for epoch in range(start, tc.epochs):
        if tc.fail_at_epoch == epoch and restored is None and rank == 0:
            raise RuntimeError(f"train.fail_at_epoch={epoch}: injected crash (recovery test)")
        model.train()
        t_epoch = time.time()
        sums = torch.zeros(4, dtype=torch.float64)  # loss * pairs, sentence loss * pairs, phrase loss * pairs, pairs
        joined = model.join() if world > 1 else contextlib.nullcontext()  # ranks may have unequal batch counts
        with joined:
            for items in batched_pairs(iter_pairs(train_paths, epoch, tc.seed, tc.max_tokens), tc.batch_size):
                b = collate(items, vocab, labels).to(device)
                with amp:
                    img, txt = model(b)
                    loss, parts = embedding_loss(core, {k: v.float() if v.is_floating_point() else v for k, v in img.items()},
                                                 {k: v.float() if v.is_floating_point() else v for k, v in txt.items()},
                                                 b, tc.margin, tc.hardest_negative, tc.phrase_loss_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(core.parameters(), tc.grad_clip)
                opt.step()
                n = len(b.caption_image)
                sums += torch.tensor([float(loss.detach()) * n, float(parts["loss_sentence"]) * n,
                                      float(parts.get("loss_phrase", 0.0)) * n, n], dtype=torch.float64)
        seconds = time.time() - t_epoch
        if world > 1:
            dist.all_reduce(sums)
        if sums[3] == 0:  # never report an epoch that trained on nothing as a success
            raise RuntimeError(f"epoch {epoch}: 0 training pairs on {world} worker(s) from {len(all_train)} train "
                               f"shards in {cfg.shard_dir} (every caption longer than train.max_tokens?)")
        metrics = {"epoch": epoch, "train_loss": float(sums[0] / sums[3].clamp(min=1)),
                   "train_loss_sentence": float(sums[1] / sums[3].clamp(min=1)),
                   "train_loss_phrase": float(sums[2] / sums[3].clamp(min=1)),
                   "train_pairs": int(sums[3]), "pairs_per_s": float(sums[3]) / max(seconds, 1e-9),
                   "epoch_seconds": seconds}
        checkpoint = None
        if rank == 0:
            if val_paths:
                val = evaluate_model(core, vocab, labels, val_paths, cfg.eval.ks, cfg.eval.captions_per_image,
                                     device=device)
                metrics.update({f"val_{k}": v for k, v in val.items() if isinstance(v, float)})
            history.append(metrics)
            if run_id and cfg.mlflow.tracking_uri:
                tracking.log_epoch(cfg.mlflow.tracking_uri, run_id, metrics, step=epoch)
            tmp = tempfile.mkdtemp(prefix="densevse-ckpt-")
            torch.save({"model_name": tc.model, "hparams": core.hparams, "state_dict": core.state_dict(),
                        "optimizer": opt.state_dict(), "vocab": vocab.words, "labels": labels.words,
                        "epoch": epoch, "history": history, "mlflow_run_id": run_id,
                        "config": config["cfg"]}, Path(tmp) / "model.pt")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
