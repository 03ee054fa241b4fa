"""Caption evaluation with pycocoevalcap, against a nearest-neighbour caption retrieval baseline.

    densevse captioner evaluate [--checkpoint F] [--split test]

Metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, COCO's PTBTokenizer; METEOR and the tokenizer run
Java). SPICE is not reported: pycocoevalcap downloads Stanford CoreNLP for it on first use, and this project runs
offline. References are all of an image's captions in the shards.

Baseline (same run, same references): for each test image, the first caption of the training image whose
whole-image feature (row 0) is nearest by cosine, as in the NN baselines of Karpathy & Fei-Fei / Devlin et al.
Where the shards carry gold object labels (the synthetic set: "small red circle"), `object_precision` counts the
(colour, shape) word pairs a caption mentions that really are in the image, and `object_recall` how many of
the image's objects at least one generated phrase names, so "names the right objects" is a number too.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from densevse.models.captioner import dense_description
from densevse.models.metrics import coco_scores, nearest_captions, object_precision, object_recall
from densevse.pipeline import storage
from densevse.pipeline.shardset import iter_samples, shard_paths
from densevse.pipeline.trained import CAPTIONER, best_path, load_trained


def evaluate_captioner(cfg, checkpoint: str | Path | None = None, split: str | None = None) -> dict:
    """Generate captions (beam search) and region phrases for a split, score them and the NN baseline; logs
    to the model's MLflow run when tracking is on; writes <output_dir>/captioner-eval-<split>.json."""
    t0 = time.time()
    split = split or cfg.eval.split
    c = cfg.captioner
    cap = load_trained(checkpoint or best_path(cfg.run.output_dir, CAPTIONER), CAPTIONER)
    test = list(iter_samples(shard_paths(cfg.shard_dir, split)))
    train_paths = shard_paths(cfg.shard_dir, "train")
    if not test or not train_paths:
        raise FileNotFoundError(f"need finished train and {split} shards in {cfg.shard_dir}")
    train_feats, train_caps = [], []
    for s in iter_samples(train_paths):
        if s["meta"]["captions"]:
            train_feats.append(s["feats"][0])
            train_caps.append(s["meta"]["captions"][0]["text"])
    keys = [s["key"] for s in test]
    refs = {s["key"]: [x["text"] for x in s["meta"]["captions"]] for s in test}
    feats0 = np.stack([s["feats"][0] for s in test])
    captions = cap.caption([s["feats"] for s in test], c.beam_size, c.max_len, c.no_repeat_ngram)
    gen = {k: t for k, (t, _) in zip(keys, captions)}
    nn = dict(zip(keys, nearest_captions(np.stack(train_feats), train_caps, feats0)))
    out: dict = {"split": split, "n_images": len(test), "beam_size": c.beam_size, "epoch": cap.ck.get("epoch"),
                 "spice": "not computed: pycocoevalcap downloads Stanford CoreNLP for SPICE (offline here)"}
    for name, scores in coco_scores(refs, {"caption": gen, "nn": nn}).items():
        out.update({f"{name}_{k}": v for k, v in scores.items()})
    labels = [(s["meta"].get("gold") or {}).get("labels") or [] for s in test]
    if any(labels):
        phrases = iter(cap.describe(np.concatenate([s["feats"][1:] for s in test]), cap.phrase_kind,
                                    c.beam_size, c.max_len, no_repeat_ngram=c.no_repeat_ngram))
        dense = [dense_description([next(phrases)[0] for _ in s["boxes"][1:]], s["boxes"][1:]) for s in test]
        out.update(caption_object_precision=object_precision([gen[k] for k in keys], labels),
                   nn_object_precision=object_precision([nn[k] for k in keys], labels),
                   dense_object_precision=object_precision(dense, labels),
                   dense_object_recall=object_recall(dense, labels))
    out["examples"] = [{"key": k, "caption": gen[k], "nn": nn[k], "refs": refs[k][:2]} for k in keys[:5]]
    out["seconds"] = round(time.time() - t0, 1)
    run_id = cap.ck.get("mlflow_run_id")
    if cfg.mlflow.tracking_uri and run_id:
        from mlflow.tracking import MlflowClient

        from densevse.pipeline.tracking.runs import log_epoch

        log_epoch(cfg.mlflow.tracking_uri, run_id, {f"{split}_{k}": v for k, v in out.items()},
                  step=int(out["epoch"] or 0))
        MlflowClient(cfg.mlflow.tracking_uri).log_text(run_id, json.dumps(out, indent=1),
                                                       f"eval/captioner-{split}.json")
    storage.put_atomic(cfg.run.output_dir / f"captioner-eval-{split}.json", json.dumps(out, indent=1))
    return out
