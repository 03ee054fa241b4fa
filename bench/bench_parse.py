"""Parse stage (Stanza): captions/s per CPU, batched (one bulk Stanza call per chunk) vs one caption per call;
and the stage's outcome on all 5,000 real Flickr8k captions (parsed / rejected by reason, phrases per caption).

    .venv/bin/python bench/bench_parse.py [--model-dir .cache/parser/stanza-synthetic] [--n 500] [--flickr8k]

Per CPU: the stage runs with one torch thread (num_threads=1, as in the pipeline's actors), so captions per
second of process CPU time is captions/s per CPU; wall-clock rates are printed too (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from densevse.pipeline.datasets.flickr8k import parse_token_file  # noqa: E402
from densevse.models.parser import DEFAULT_DIR  # noqa: E402
from densevse.stages.base import empty_row  # noqa: E402
from densevse.stages.parse import StanzaParse, caption_stats  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "Flickr8k.token.txt"


def flickr8k_rows(path: Path = FLICKR) -> list[dict]:
    """One row per image, its captions as the ingest stage leaves them."""
    return [empty_row(key=name.split(".")[0], captions=json.dumps([{"index": i, "text": t} for i, t in enumerate(caps)]))
            for name, caps in parse_token_file(path).items()]


def run_rows(stage: StanzaParse, rows: list[dict], batch_rows: int = 64) -> list[dict]:
    """As pipeline.preprocess does per shard: `batch_rows` rows per process() call."""
    return [r for i in range(0, len(rows), batch_rows) for r in stage.process(rows[i:i + batch_rows])]


def rate(stage: StanzaParse, texts: list[str], chunk: int) -> dict:
    """Captions/s (wall) and captions per CPU-second, parsing `chunk` captions per Stanza call."""
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), chunk):
        stage.parse_texts(texts[i:i + chunk])
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"chunk": chunk, "captions": len(texts), "per_s_wall": round(len(texts) / wall, 1),
            "per_cpu_s": round(len(texts) / cpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(DEFAULT_DIR))
    ap.add_argument("--n", type=int, default=500, help="captions timed each way")
    ap.add_argument("--chunk", type=int, default=320, help="captions per bulk call (64 rows x 5 captions)")
    ap.add_argument("--flickr8k", action="store_true", help="also run the stage on all Flickr8k captions")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    StanzaParse.prepare({"model_dir": args.model_dir})  # trains the default models once if missing
    stage = StanzaParse({"model_dir": args.model_dir})
    if FLICKR.is_file():
        texts = [t for caps in parse_token_file(FLICKR).values() for t in caps][: args.n]
        source = "flickr8k"
    else:
        from densevse.pipeline.datasets.synthetic import treebank
        from densevse.models.trees import from_ptb

        texts, source = [" ".join(from_ptb(s)["tokens"]) for s in treebank(args.n, seed=7)], "synthetic"
    stage.parse_texts(texts[:20])  # warm-up
    out = {"source": source, "batched": rate(stage, texts, args.chunk), "one_at_a_time": rate(stage, texts, 1)}
    out["speedup_per_cpu"] = round(out["batched"]["per_cpu_s"] / out["one_at_a_time"]["per_cpu_s"], 2)
    out["speedup_wall"] = round(out["batched"]["per_s_wall"] / out["one_at_a_time"]["per_s_wall"], 2)
    print(f"{source} captions, {args.n} each way, 1 torch thread:")
    for k in ("batched", "one_at_a_time"):
        r = out[k]
        print(f"  {k:14s} chunk {r['chunk']:4d}: {r['per_cpu_s']:7.1f} captions/CPU-s  {r['per_s_wall']:7.1f} captions/s wall")
    print(f"  batched / one-at-a-time = {out['speedup_per_cpu']}x per CPU ({out['speedup_wall']}x wall)")

    if args.flickr8k and FLICKR.is_file():
        rows = flickr8k_rows()
        t0 = time.perf_counter()
        out["flickr8k"] = {**caption_stats(run_rows(stage, rows)), "images": len(rows),
                           "seconds": round(time.perf_counter() - t0, 1)}
        print("flickr8k:", json.dumps(out["flickr8k"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
