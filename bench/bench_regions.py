"""Regions + region features: speed (images per CPU-second, one torch thread) and feature quality.

    .venv/bin/python bench/bench_regions.py [--detector .cache/detector-synthetic] [--threads 1] [--json out.json]

Speed: the detectron2 regions stage, then each feature extractor on its boxes (whole image + top 19):
  roialign = efficientnet_lite0 (stages/features.py), crops = efficientnet_lite0_crops, boxhead =
  detectron2_boxhead; on synthetic scenes and, when present, the real Flickr8k photos.
Quality: region features of the gold objects of synthetic scenes -> shape (5 classes) and colour (6 classes),
  by a linear probe (softmax regression) and 1-nearest-neighbour (cosine), trained and tested on disjoint
  scenes. Plus the detector's proposal recall on held-out scenes.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from densevse.stages import FEATURES, REGIONS  # noqa: E402
from densevse.stages.base import empty_row, npy_bytes, npy_load  # noqa: E402
from densevse.models.detector import default_detector_dir  # noqa: E402
from densevse.models.metrics import proposal_recall

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "images"


def jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def synthetic_rows(n: int, seed: int):
    from densevse.pipeline.datasets.synthetic import make_image

    rows, labels = [], []
    for i in range(n):
        img, ann = make_image(seed, i, 224, n_captions=1)
        boxes = np.asarray([[0, 0, 224, 224]] + ann["boxes"], np.float32)
        rows.append(empty_row(key=f"s{i}", image=jpeg(img), width=224, height=224, boxes=npy_bytes(boxes),
                              gold=json.dumps({"boxes": ann["boxes"]})))
        labels += [lab.split()[1:] for lab in ann["labels"]]  # [colour, shape] per object
    return rows, labels


def flickr_rows(n: int):
    from PIL import Image

    files = sorted(FLICKR.glob("*.jpg"))[:n] if FLICKR.is_dir() else []
    rows = []
    for f in files:
        with Image.open(f) as im:
            rows.append(empty_row(key=f.stem, image=f.read_bytes(), width=im.width, height=im.height))
    return rows


def run(stage, rows, batch=8) -> tuple[list[dict], float]:
    """(output rows, CPU seconds). CPU time, not wall time: with one torch thread it is the cost per CPU, and
    it does not change when other jobs share the machine (wall-clock figures there would measure the load)."""
    rows = [dict(r) for r in rows]
    t = time.process_time()
    out = []
    for i in range(0, len(rows), batch):
        out += stage.process(rows[i:i + batch])
    return out, time.process_time() - t


def linear_probe(xtr, ytr, xte, yte, steps=300) -> float:
    import torch

    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = torch.tensor((xtr - mu) / sd), torch.tensor((xte - mu) / sd)
    classes = sorted(set(ytr) | set(yte))
    ytr_t = torch.tensor([classes.index(y) for y in ytr])
    w = torch.zeros(xtr.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr_t) + 1e-3 * (w ** 2).sum()
        loss.backward()
        opt.step()
    pred = (xte @ w + b).argmax(1).numpy()
    return float(np.mean([classes[p] == y for p, y in zip(pred, yte)]))


def nn1(xtr, ytr, xte, yte) -> float:
    a = xtr / (np.linalg.norm(xtr, axis=1, keepdims=True) + 1e-8)
    b = xte / (np.linalg.norm(xte, axis=1, keepdims=True) + 1e-8)
    idx = (b @ a.T).argmax(1)
    return float(np.mean([ytr[i] == y for i, y in zip(idx, yte)]))


def object_feats(rows) -> np.ndarray:
    return np.concatenate([npy_load(r["feats"])[1:] for r in rows]).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default=str(ROOT / default_detector_dir()))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-images", type=int, default=32)
    ap.add_argument("--probe-train", type=int, default=120)
    ap.add_argument("--probe-test", type=int, default=80)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads, "detector": args.detector}
    REGIONS.get("detectron2").prepare({"config": args.detector})  # trains the default detector if missing
    regions = REGIONS.get("detectron2")({"config": args.detector, "threads": args.threads})
    extractors = {
        "roialign": FEATURES.get("efficientnet_lite0")({"threads": args.threads}),
        "crops": FEATURES.get("efficientnet_lite0_crops")({"threads": args.threads}),
        "boxhead": FEATURES.get("detectron2_boxhead")({"config": args.detector, "threads": args.threads}),
    }
    for name, stage in [*extractors.items(), ("regions", regions)]:  # warm-up (first call allocates)
        stage.process([dict(r) for r in synthetic_rows(1, 999)[0]])

    # ---- speed
    sets = {"synthetic": synthetic_rows(args.speed_images, 1234)[0], "flickr8k": flickr_rows(args.speed_images)}
    for set_name, rows in sets.items():
        if not rows:
            print(f"{set_name}: skipped (no images at {FLICKR})")
            continue
        boxed, t_reg = run(regions, rows)
        ok = [r for r in boxed if not r["reject"]]
        n_boxes = float(np.mean([len(npy_load(r["boxes"])) for r in ok]))
        entry = {"images": len(rows), "rejected": len(rows) - len(ok), "boxes_per_image": round(n_boxes, 1),
                 "regions_img_per_cpu_s": round(len(ok) / t_reg, 2)}
        for name, stage in extractors.items():
            _, t = run(stage, ok)
            entry[f"{name}_img_per_cpu_s"] = round(len(ok) / t, 2)
            entry[f"regions+{name}_img_per_cpu_s"] = round(len(ok) / (t_reg + t), 2)
        if set_name == "synthetic":
            gold = [np.asarray(json.loads(r["gold"])["boxes"]) for r in ok]
            entry["recall@0.5_top19"] = round(proposal_recall(gold, [npy_load(r["boxes"])[1:] for r in ok]), 4)
        res[set_name] = entry
        print(set_name, json.dumps(entry))

    # ---- quality (gold boxes, so only the features differ)
    tr_rows, tr_lab = synthetic_rows(args.probe_train, 31)
    te_rows, te_lab = synthetic_rows(args.probe_test, 32)
    q = {}
    for name, stage in extractors.items():
        xtr, _ = run(stage, tr_rows)
        xte, _ = run(stage, te_rows)
        xtr, xte = object_feats(xtr), object_feats(xte)
        q[name] = {"dim": int(xtr.shape[1])}
        for k, attr in enumerate(("colour", "shape")):
            ytr, yte = [lab[k] for lab in tr_lab], [lab[k] for lab in te_lab]
            q[name][f"{attr}_probe"] = round(linear_probe(xtr, ytr, xte, yte), 4)
            q[name][f"{attr}_1nn"] = round(nn1(xtr, ytr, xte, yte), 4)
        print("quality", name, json.dumps(q[name]))
    res["quality"] = {"train_objects": len(tr_lab), "test_objects": len(te_lab), **q}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
