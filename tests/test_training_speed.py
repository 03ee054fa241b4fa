"""Training speed-ups: early stopping on the validation score (pipeline/training/stopping.py) and the
prefetching, step-timed batch iterator (pipeline/training/prefetch.py)."""
from __future__ import annotations

import threading
import time

import pytest

from densevse.pipeline.training.embedding import EmbeddingTask
from densevse.pipeline.training.prefetch import StepTimer, prefetch
from densevse.pipeline.training.stopping import early_stop


def _hist(*rsums):
    return [{"epoch": i, "val_rsum": r, "train_loss": 1.0} for i, r in enumerate(rsums)]


def score(entry):
    return entry["val_rsum"]


def test_early_stop_after_patience_epochs_without_improvement():
    assert early_stop(_hist(10, 20, 19), score, 2) is None  # one epoch since the best
    reason = early_stop(_hist(10, 20, 19, 18), score, 2)
    assert "best epoch 1" in reason and "2 epoch(s)" in reason and "validation rsum" in reason
    assert early_stop(_hist(10, 20, 20, 20), score, 2) is not None  # a tie is no improvement
    assert early_stop(_hist(10, 20, 19, 21), score, 2) is None  # improved at the last epoch


def test_early_stop_off_and_edge_cases():
    h = _hist(30, 1, 1, 1, 1)
    assert early_stop(h, score, None) is None
    assert early_stop(h, score, 0) is None
    assert early_stop([], score, 1) is None
    assert early_stop(_hist(5), score, 1) is None  # the only epoch is the best
    assert early_stop(_hist(5, 4), score, 1) is not None


def test_patience_is_validated_in_the_config():
    from pydantic import ValidationError

    from densevse.pipeline.config import load_config

    assert load_config("pipeline.yaml", ["train.patience=3"]).train.patience == 3
    assert load_config("pipeline.yaml", ["train.patience=null"]).train.patience is None  # off
    with pytest.raises((ValidationError, ValueError), match="patience"):
        load_config("pipeline.yaml", ["train.patience=-1"])


def test_prefetch_keeps_order_and_ends():
    assert list(prefetch(range(100), depth=3)) == list(range(100))
    assert list(prefetch([], depth=1)) == []


def test_prefetch_runs_ahead_of_the_consumer():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    deadline = time.time() + 5
    while len(produced) < 3 and time.time() < deadline:  # 1 and 2 prepared while the consumer holds 0
        time.sleep(0.01)
    assert produced[:3] == [0, 1, 2]
    assert list(it) == [1, 2, 3, 4]


def test_prefetch_raises_the_producers_error_in_place():
    def items():
        yield 1
        yield 2
        raise KeyError("bad shard")

    got = []
    with pytest.raises(KeyError, match="bad shard"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_consumer_stopping_early_stops_the_producer():
    def forever():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = prefetch(forever(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="depth"):
        list(prefetch([1], depth=0))


def test_step_timer_splits_wait_and_compute():
    def slow():
        for i in range(3):
            time.sleep(0.05)  # loading
            yield i

    t = StepTimer()
    for _ in t.iterate(slow()):
        time.sleep(0.02)  # compute
    m = t.metrics()
    assert t.steps == 3
    assert m["data_wait_s"] >= 0.14 and m["compute_s"] >= 0.05
    assert 0.1 < m["compute_share"] < 0.5
    t2 = StepTimer()
    for _ in t2.iterate(prefetch(slow(), depth=3)):
        time.sleep(0.1)  # compute slower than loading: after the first batch, no waiting
    assert t2.metrics()["compute_share"] > 0.8
    assert StepTimer().metrics() == {}


@pytest.mark.slow
def test_training_stops_early_keeps_the_best_epoch_and_reports_compute_share(tmp_path):
    """The real Ray Train loop on fixture shards: patience 2 with a flat score stops after epoch 2 of 6, on the
    workers and in the summary (with why); best.pt is epoch 0; each epoch logs its compute share."""
    from densevse.models.checkpoint import load_checkpoint
    from densevse.pipeline.config import load_config
    from densevse.pipeline.training.loop import fit
    from tests.shard_fixture import write_fixture_shards

    class FlatTask(EmbeddingTask):  # local: pickled by value to the Ray workers (this module is not importable there)
        """Every epoch scores the same, so the first epoch stays the best and patience runs out."""

        def best_score(self, entry):
            return 0.0

    shards = tmp_path / "shards"
    write_fixture_shards(shards, n_train=24, n_val=6, n_test=0, feat_dim=16, per_shard=12)
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"shards.dir={shards}", "ray.num_cpus=2",
                             "train.word_vectors=random", "train.epochs=6", "train.patience=2", "train.batch_size=8",
                             "train.embed_dim=16", "train.hidden_dim=16"])
    summary = fit(cfg, FlatTask(cfg))
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert summary["best_epoch"] == 0 and "best epoch 0" in summary["early_stop"]
    assert load_checkpoint(summary["best_model"])["epoch"] == 0
    for h in summary["history"]:
        assert 0 < h["compute_share"] <= 1 and h["data_wait_s"] >= 0 and h["compute_s"] > 0


def test_embedding_epoch_prefetched_or_inline_gives_the_same_training(tmp_path):
    """The embedding task's epoch without Ray: prefetched batches (or inline, train.prefetch=0) train the same
    pairs to the same loss, and the step timer says how the epoch's time was spent."""
    import torch

    from densevse.pipeline.config import load_config
    from densevse.pipeline.shardset import shard_paths
    from densevse.pipeline.shardset import rank_shards
    from tests.shard_fixture import write_fixture_shards

    shards = tmp_path / "shards"
    write_fixture_shards(shards, n_train=24, n_val=0, n_test=0, feat_dim=16, per_shard=12)
    cfg = load_config(None, [f"shards.dir={shards}", "train.word_vectors=random", "train.batch_size=8",
                             "train.embed_dim=16", "train.hidden_dim=16"])
    losses = []
    for prefetch_depth in (cfg.train.prefetch, 0):
        torch.manual_seed(0)
        task = EmbeddingTask(cfg)
        task.prefetch_depth = prefetch_depth
        paths = shard_paths(shards, "train")
        task.prepare(cfg, paths, None)
        task.setup(cfg, rank_shards(paths, 0, 1), [], torch.device("cpu"))
        model = task.make_model(None)
        sums, pairs = task.train_epoch(model, model, torch.optim.Adam(model.parameters(), lr=1e-3), 0)
        m = task.step_timer.metrics()
        assert pairs > 0 and task.step_timer.steps >= 2 and 0 < m["compute_share"] <= 1
        losses.append(sums["loss"] / pairs)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
