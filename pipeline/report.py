"""report.html (PNGs beside it) under <output_dir>/report/: loss and R@K curves, the R@K table, test images with
their region proposals and the caption phrase each matched best, and (when the run has a trained captioner) test
images with their generated caption and dense description. Fed by what the run already has: the training
history (<output_dir>/train-<model>.json) and the evaluation result."""
from __future__ import annotations

import html
import json
from pathlib import Path

KS = (1, 5, 10)


def _curves(history: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] + 1 for h in history]
    names = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [h.get("train_loss") for h in history], marker="o")
    ax.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    names.append("loss.png")
    keys = [f"val_{d}_r{k}" for d in ("i2t", "t2i") for k in KS if f"val_{d}_r{k}" in (history[0] if history else {})]
    if keys:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for k in keys:
            ax.plot(epochs, [h.get(k) for h in history], marker="o", label=k[4:].replace("_r", " R@"))
        ax.set(xlabel="epoch", ylabel="recall (%)", title="validation R@K")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "recall.png", dpi=100)
        plt.close(fig)
        names.append("recall.png")
    return names


def recall_table_html(ev: dict) -> str:
    """The R@K table of an evaluation result as HTML (pure)."""
    head = "".join(f"<th>R@{k}</th>" for k in KS) + "<th>Med r</th>"
    rows = []
    for d, name in (("i2t", "image &rarr; text"), ("t2i", "text &rarr; image")):
        cells = "".join(f"<td>{ev[f'{d}_r{k}']:.1f}</td>" if f"{d}_r{k}" in ev else "<td>-</td>" for k in KS)
        medr = f"<td>{ev[f'{d}_medr']:.0f}</td>" if f"{d}_medr" in ev else "<td>-</td>"
        rows.append(f"<tr><th>{name}</th>{cells}{medr}</tr>")
    return f'<table id="recall"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


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


def _matched_images(cfg, checkpoint: Path, paths: list[Path], out: Path, n: int = 4) -> list[tuple[str, list[str]]]:
    """The first n test images, each region drawn (pipeline/serving/describe.draw) with the caption phrase that
    matched it best; (png name, captions) each."""
    import torch

    from densevse.models.batch import collate
    from densevse.models.checkpoint import load_model
    from densevse.pipeline.serving.describe import draw
    from densevse.pipeline.training.data import eval_items

    model, vocab, labels, _ = load_model(checkpoint, "cpu")
    model.eval()
    items = next(eval_items(paths, cfg.eval.captions_per_image, n, with_image=True), [])
    if not items:
        return []
    b = collate(items, vocab, labels)
    with torch.no_grad():
        img, txt = model(b)
        ps = model.phrase_scores(img, txt).float().numpy()
    matched = region_phrases(ps, b.caption_image.numpy(), b.phrase_caption.numpy(), b.cand.numpy(), b.phrase_text)
    found = []
    for i, ((s, caps), regions) in enumerate(zip(items, matched)):
        src = out / f"image-{i}.jpg"
        src.write_bytes(s["jpg"])
        h, w = s["boxes"][0][3], s["boxes"][0][2]
        boxes = b.boxes[i].numpy()
        result = {"image": str(src), "width": int(w), "height": int(h), "caption": caps[0]["text"] if caps else "",
                  "dense": "", "regions": [{"box": [float(v) for v in boxes[r]], "phrase": p}
                                           for r, p in regions if r > 0]}
        draw(result, out / f"matched-{i}.png")
        src.unlink()
        found.append((f"matched-{i}.png", [c["text"] for c in caps]))
    return found


def _captioned_images(cfg, paths: list[Path], out: Path, n: int = 4) -> list[tuple[str, list[str]]]:
    """When the run has a trained captioner: the first n test images described (caption, region phrases, dense)."""
    from densevse.models.captioner import Captioner
    from densevse.pipeline.serving.describe import Describer, draw, region_proposer
    from densevse.pipeline.training.captioner import default_checkpoint
    from densevse.pipeline.training.data import iter_samples

    ck = default_checkpoint(cfg)
    if not ck.is_file():
        return []
    propose, note = region_proposer(cfg)
    d = Describer(cfg, Captioner.load(ck), propose, note)
    found = []
    for i, s in enumerate(iter_samples(paths, with_image=True)):
        if i >= n:
            break
        src = out / f"describe-{i}.jpg"
        src.write_bytes(s["jpg"])
        r = d.describe(src)
        draw(r, out / f"captioned-{i}.png")
        src.unlink()
        found.append((f"captioned-{i}.png", [f"caption: {r['caption']}", f"dense: {r['dense']}"]))
    return found


def _figures(title: str, figs: list[tuple[str, list[str]]]) -> list[str]:
    if not figs:
        return []
    out = [f"<h2>{html.escape(title)}</h2><div class=grid>"]
    for name, lines in figs:
        items = "".join(f"<li>{html.escape(c)}</li>" for c in lines)
        out.append(f'<figure><img src="{name}" alt="{name}"><figcaption><ul>{items}</ul></figcaption></figure>')
    return out + ["</div>"]


def write_report(cfg, summary: dict) -> Path:
    """<output_dir>/report/report.html from the run's summary ({"train", "evaluate"}) and its saved history."""
    from densevse.pipeline.evaluation.retrieval import default_checkpoint
    from densevse.pipeline.preprocess.shards import shard_paths

    out = Path(cfg.run.output_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    ev = summary.get("evaluate") or {}
    hist_file = Path(cfg.run.output_dir) / f"train-{cfg.train.model}.json"
    history = json.loads(hist_file.read_text()).get("history", []) if hist_file.is_file() else []
    parts = [f"<h1>DenseVSE run: {html.escape(cfg.run.name if hasattr(cfg.run, 'name') else '')}</h1>"]
    if ev:
        parts += ["<h2>Retrieval</h2>", recall_table_html(ev)]
        if "grounding_acc" in ev:
            chance = ev.get("grounding_chance", 0)
            parts.append(f"<p>phrase grounding {ev['grounding_acc']:.1f} % (chance {chance:.1f} %)</p>")
    if history:
        parts += ["<h2>Training</h2>", *[f'<img src="{n}" alt="{n}">' for n in _curves(history, out)]]
    paths = shard_paths(cfg.shard_dir, ev.get("split") or cfg.eval.split)
    checkpoint = Path(ev.get("checkpoint") or default_checkpoint(cfg))
    if paths and checkpoint.is_file():
        parts += _figures("Test images: each proposal with the caption phrase it matched best",
                          _matched_images(cfg, checkpoint, paths, out))
    if paths:
        parts += _figures("Captioner: generated caption and dense description", _captioned_images(cfg, paths, out))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}.grid{display:flex;flex-wrap:wrap;gap:1em}"
             "figure{width:260px;margin:0}figure img{width:260px}figcaption{font-size:12px}")
    page = out / "report.html"
    page.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>DenseVSE report</title>"
                    f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return page
