"""What the parsers make of real captions: the real-treebank parser (GUM) against the synthetic-grammar one.

    .venv/bin/python bench/parser_captions.py [--real .cache/parser/stanza-gum]
        [--synthetic .cache/parser/stanza-synthetic] [--show 20] [--json out.json] [--markdown out.md]

Prints, for each parser:
  - the trees of `--show` real captions (half Flickr8k, half COCO, a fixed spread over the files);
  - over all 5,000 Flickr8k captions: phrases per caption and the phrase-label histogram (phrases per caption
    by label), and how many captions were parsed / rejected;
  - evalb bracket F1 on the synthetic set's gold trees (held-out seed), to decide which parser the synthetic
    default keeps;
  - the models.json figures of the run that trained it (GUM test F1, POS accuracy, training time).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from densevse.models import trees as T  # noqa: E402
from densevse.models.parser import DEFAULT_DIR  # noqa: E402
from densevse.pipeline.datasets.flickr8k import parse_token_file  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FLICKR = SHARED / "flickr8k-1k" / "Flickr8k.token.txt"
COCO_CAPS = SHARED / "coco-mini" / "annotations" / "captions_val2017.json"


def sample_captions(n: int) -> list[tuple[str, str]]:
    """(source, caption): n // 2 Flickr8k and n - n // 2 COCO captions, evenly spread (deterministic)."""
    flickr = [c for caps in parse_token_file(FLICKR).values() for c in caps]
    coco = ([a["caption"].strip() for a in json.loads(COCO_CAPS.read_text())["annotations"]]
            if COCO_CAPS.is_file() else [])
    out = [("flickr8k", flickr[i * len(flickr) // (n // 2)]) for i in range(n // 2)]
    k = n - n // 2
    out += [("coco", coco[i * len(coco) // k]) for i in range(k)] if coco else []
    return out


def label_histogram(stage, captions: list[str]) -> dict:
    trees, reasons = stage.parse_texts(captions)
    ok = [t for t in trees if t is not None]
    labels = Counter(p["label"] for t in ok for p in T.phrases(t))
    return {"captions": len(captions), "parsed": len(ok),
            "rejected": dict(Counter(r.split(":")[0] for r in reasons if r)),
            "phrases_per_caption": round(sum(labels.values()) / max(1, len(ok)), 3),
            "per_caption_by_label": {lab: round(n / max(1, len(ok)), 3) for lab, n in labels.most_common()}}


def synthetic_f1(model_dir: Path, n: int = 500) -> dict:
    from densevse.pipeline.datasets.synthetic import treebank
    from densevse.pipeline.stage_models.parser import evaluate

    return evaluate(model_dir, list(dict.fromkeys(treebank(n, seed=777))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=ROOT / ".cache/parser/stanza-gum")
    ap.add_argument("--synthetic", type=Path, default=ROOT / DEFAULT_DIR)
    ap.add_argument("--show", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="write the trees and histograms as markdown")
    args = ap.parse_args()
    if not FLICKR.is_file():
        print(f"no {FLICKR}: nothing to measure", file=sys.stderr)
        return 2
    from densevse.stages.parse import StanzaParse

    flickr_all = [c for caps in parse_token_file(FLICKR).values() for c in caps]
    shown = sample_captions(args.show)
    result, md = {}, []
    for name, d in (("real (GUM)", args.real), ("synthetic grammar", args.synthetic)):
        if not (d / "models.json").is_file():
            print(f"{name}: no models in {d}, skipped", file=sys.stderr)
            continue
        stage = StanzaParse({"model_dir": str(d)})
        trees, reasons = stage.parse_texts([c for _, c in shown])
        hist = label_histogram(stage, flickr_all)
        trained = json.loads((d / "models.json").read_text())
        result[name] = {"model_dir": str(d), "histogram": hist, "synthetic_gold": synthetic_f1(d),
                        "trained": {"test": trained["eval"]["test"], "train_seconds": trained["train_seconds"],
                                    "treebank": trained["treebank"]},
                        "trees": [{"source": s, "caption": c, "tree": T.to_ptb(t) if t else None, "reason": r}
                                  for (s, c), t, r in zip(shown, trees, reasons)]}
        print(f"\n=== {name}: {d}")
        print(f"trained: test {trained['eval']['test']}, {trained['train_seconds']}")
        print(f"synthetic gold trees: {result[name]['synthetic_gold']}")
        print(f"Flickr8k {hist['captions']} captions: parsed {hist['parsed']}, rejected {hist['rejected']}, "
              f"{hist['phrases_per_caption']} phrases per caption")
        print("phrases per caption by label: " + ", ".join(f"{k} {v}" for k, v in hist["per_caption_by_label"].items()))
        md.append(f"### {name}\n\nphrases per caption {hist['phrases_per_caption']} over {hist['parsed']} Flickr8k "
                  "captions; by label: " + ", ".join(f"{k} {v}" for k, v in hist["per_caption_by_label"].items()))
        md.append("```")
        for t in result[name]["trees"]:
            line = t["tree"] or f"(rejected: {t['reason']})"
            print(f"  [{t['source']}] {line}")
            md.append(f"[{t['source']}] {line}")
        md.append("```\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
