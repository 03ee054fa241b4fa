"""The figures of a trained model, drawn once for the two places that show them: its MLflow run
(pipeline/tracking/registry.py logs them under plots/) and report.html (pipeline/report.py saves them as PNGs).

    curves(history)                                    loss and validation R@K per epoch
    best_phrase_figures(model, vocab, labels, items)   each image's candidate regions, each labelled with the
                                                       phrase of the image's own captions that scores highest on it
    alignment_figure(model, vocab, labels, shard_dir)  that figure for the first val image (plots/alignment.png)

Reads shards only to pick the alignment figure's image; loading the model is the caller's.
"""
from __future__ import annotations

import io
from pathlib import Path

KS = (1, 5, 10)
LOSSES = ("train_loss", "train_loss_sentence", "train_loss_phrase")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def curves(history: list[dict]) -> dict:
    """{"loss_curves": the training losses, "recall_curves": validation R@1/5/10 both ways (when the history
    has them)}, per epoch counted from 1 as the console counts."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] + 1 for h in history]
    figs = {}

    def axes(ylabel: str, title: str):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    fig, ax = axes("loss", "training loss")
    for k in LOSSES:
        if any(h.get(k) for h in history):
            ax.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", label=k)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["loss_curves"] = fig
    keys = [f"val_{d}_r{k}" for d in ("i2t", "t2i") for k in KS if history and f"val_{d}_r{k}" in history[0]]
    if keys:
        fig, ax = axes("recall (%)", "validation R@K")
        for k in keys:
            ax.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", label=k[4:].replace("_r", " R@"))
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs["recall_curves"] = fig
    return figs


def region_phrases(scores, caption_image, phrase_caption, cand, phrase_text: list[str]) -> list[list[tuple]]:
    """Per image, per candidate region r: (r, the phrase of the image's own captions that scores highest on r).
    `scores` (P, B, R) as models' phrase_scores; pure, so it tests without a model."""
    import numpy as np

    out = []
    own_img = np.asarray(caption_image)[np.asarray(phrase_caption)]
    for i in range(scores.shape[1]):
        own = np.flatnonzero(own_img == i)
        rows = np.flatnonzero(np.asarray(cand[i]))
        out.append([(int(r), phrase_text[own[int(np.argmax(scores[own, i, r]))]]) for r in rows] if len(own) else [])
    return out


def best_phrase_figures(model, vocab, labels, items: list) -> list:
    """One figure per image of `items` (an eval_items batch read with images): its candidate regions (the
    proposals; the whole image, dashed, when it has none), each labelled with region_phrases' phrase, under the
    image's first caption."""
    import torch

    from densevse.models.batch import collate

    b = collate(items, vocab, labels, getattr(model, "caption_tree", "parse"))
    with torch.no_grad():
        img, txt = model(b)
        ps = model.phrase_scores(img, txt).float().cpu().numpy()
    matched = region_phrases(ps, b.caption_image.numpy(), b.phrase_caption.numpy(), b.cand.numpy(), b.phrase_text)
    return [_region_figure(s["jpg"], b.boxes[i].numpy(), regions, caps[0]["text"] if caps else "")
            for i, ((s, caps), regions) in enumerate(zip(items, matched))]


def _region_figure(jpeg: bytes, boxes, regions: list[tuple[int, str]], title: str):
    from PIL import Image

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6.6))
    ax.imshow(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    colors = plt.cm.tab10.colors
    for r, phrase in regions:
        x0, y0, x1, y1 = (float(v) for v in boxes[r])
        c = colors[r % 10]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=c, lw=2, ls="-" if r else "--"))
        ax.text(x0, y0, phrase, color="white", fontsize=8, va="bottom", bbox={"facecolor": c, "alpha": 0.8, "pad": 1})
    ax.set_title(title, fontsize=9, wrap=True)
    ax.axis("off")
    return fig


def alignment_figure(model, vocab, labels, shard_dir, split: str = "val"):
    """best_phrase_figures of the first image of `split` (else test, else train) with its first caption; None
    without shards."""
    from densevse.pipeline.shardset import eval_items, shard_paths

    paths = shard_paths(shard_dir, split) or shard_paths(shard_dir, "test") or shard_paths(shard_dir, "train")
    items = next(eval_items(paths[:1], 1, 1, with_image=True), None)
    return best_phrase_figures(model, vocab, labels, items)[0] if items else None


def save_png(fig, path: Path) -> Path:
    """Write a figure as a PNG and free it."""
    plt = _pyplot()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
