"""Tree-LSTM and data-parallel throughput.

    python bench/bench_treelstm.py --shards runs/default/shards     # or omit: writes a fixture shard set

1. HM-LSTM training steps (forward, both losses, backward, Adam) with the level-batched tree-LSTM vs the
   naive per-node recursion: training pairs/s and the ratio. Same batches, same weights.
2. `train(cfg)` with 1 vs 2 Ray Train workers (DDP over gloo): pairs/s over the epochs after the first.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def steps_per_s(naive: bool, batches, dims: dict, cfg) -> float:
    from densevse.models import new_embedding_model
    from densevse.models.losses import embedding_loss

    torch.manual_seed(0)
    model = new_embedding_model("hmlstm", cfg.train, **dims)
    model.naive = naive
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pairs, t0 = 0, None
    for i, b in enumerate(batches):
        if i == 1:  # first step is warm-up
            t0, pairs = time.perf_counter(), 0
        img, txt = model(b)
        loss, _ = embedding_loss(model, img, txt, b, 0.2, False, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pairs += len(b.caption_image)
    return pairs / (time.perf_counter() - t0)


def main(argv=None) -> int:
    from densevse.pipeline.config import parse_config
    from densevse.pipeline.shardset import iter_samples, shard_paths
    from densevse.pipeline.training.data import batched_pairs, build_vocabs, iter_pairs
    from densevse.models.batch import collate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each Ray Train run")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-treelstm-"))
    if args.shards is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from shard_fixture import write_fixture_shards

        args.shards = write_fixture_shards(tmp / "shards", n_train=400, n_val=50, n_test=10, feat_dim=1280,
                                           per_shard=50)
    cfg = parse_config({"run": {"output_dir": str(tmp / "run")}, "shards": {"dir": str(args.shards)},
                        "train": {"hidden_dim": args.hidden, "embed_dim": args.hidden, "batch_size": args.batch_size,
                                  "epochs": args.epochs}})
    paths = shard_paths(args.shards, "train")
    vocab, labels = build_vocabs(paths)
    pairs = iter_pairs(paths, 0, 0, cfg.train.max_tokens)
    batches = [collate(items, vocab, labels)
               for _, items in zip(range(args.batches + 1), batched_pairs(pairs, args.batch_size))]
    dims = {"vocab_size": len(vocab), "n_labels": len(labels), "feat_dim": next(iter_samples(paths[:1]))["feats"].shape[1]}
    torch.set_num_threads(1)
    fast = steps_per_s(False, batches, dims, cfg)
    slow = steps_per_s(True, batches[:3], dims, cfg)
    nodes = sum(len(b.parent) for b in batches) / len(batches)
    print(f"tree-LSTM training, batch {args.batch_size} captions (~{nodes:.0f} tree nodes), 1 thread:")
    print(f"  level-batched {fast:8.1f} pairs/s\n  naive         {slow:8.1f} pairs/s\n  ratio         {fast / slow:8.1f}x")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from densevse.pipeline.training.tasks import train

    res = {}
    for w in args.workers:
        cfg.train.num_workers = w
        s = train(cfg)
        hist = s["history"][1:] or s["history"]
        res[w] = sum(h["pairs_per_s"] for h in hist) / len(hist)
        print(f"  Ray Train, {w} worker(s): {res[w]:8.1f} pairs/s (epochs 2..{len(s['history'])}, "
              f"{s['history'][-1]['train_pairs']} pairs/epoch)", flush=True)
    if 1 in res and 2 in res:
        print(f"  2 vs 1 workers: {res[2] / res[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
