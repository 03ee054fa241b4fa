"""report.html (PNGs beside it) under <output_dir>/report/: loss and R@K curves, the R@K table, test images with
their region proposals and the caption phrase each matched best, and (when the run has a trained captioner) test
images with their generated caption and dense description. Fed by what the run already has: the training
history (<output_dir>/train-<model>.json) and the evaluation result. With the output dir in object storage the
report is drawn in a local temporary dir and uploaded (storage.local)."""
from __future__ import annotations

import html
import json
from pathlib import Path

from densevse.pipeline import storage

KS = (1, 5, 10)


def _curves(history: list[dict], out: Path) -> list[str]:
    """The run's curves (pipeline/tracking/figures.py, as logged to MLflow) as loss.png and recall.png."""
    from densevse.pipeline.tracking.figures import curves, save_png

    files = {"loss_curves": "loss.png", "recall_curves": "recall.png"}
    return [save_png(fig, out / files[name]).name for name, fig in curves(history).items()]


def recall_table_html(ev: dict) -> str:
    """The R@K table of an evaluation result as HTML (pure)."""
    head = "".join(f"<th>R@{k}</th>" for k in KS) + "<th>Med r</th>"
    rows = []
    for d, name in (("i2t", "image &rarr; text"), ("t2i", "text &rarr; image")):
        cells = "".join(f"<td>{ev[f'{d}_r{k}']:.1f}</td>" if f"{d}_r{k}" in ev else "<td>-</td>" for k in KS)
        medr = f"<td>{ev[f'{d}_medr']:.0f}</td>" if f"{d}_medr" in ev else "<td>-</td>"
        rows.append(f"<tr><th>{name}</th>{cells}{medr}</tr>")
    return f'<table id="recall"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _matched_images(cfg, checkpoint: storage.Location, paths: list, out: Path,
                    n: int = 4) -> list[tuple[str, list[str]]]:
    """The first n test images, each candidate region labelled with the caption phrase that matched it best (the
    figure of the MLflow run's plots/alignment.png); (png name, captions) each."""
    from densevse.pipeline.shardset import eval_items
    from densevse.pipeline.tracking.figures import best_phrase_figures, save_png
    from densevse.pipeline.trained import EMBEDDING, load_trained

    model, vocab, labels, _ = load_trained(checkpoint, EMBEDDING)
    items = next(eval_items(paths, cfg.eval.captions_per_image, n, with_image=True), [])
    figs = best_phrase_figures(model, vocab, labels, items) if items else []
    return [(save_png(fig, out / f"matched-{i}.png").name, [c["text"] for c in caps])
            for i, (fig, (_, caps)) in enumerate(zip(figs, items))]


def _captioned_images(cfg, paths: list, out: Path, n: int = 4) -> list[tuple[str, list[str]]]:
    """When the run has a trained captioner: the first n test images described (caption, region phrases, dense)."""
    from densevse.pipeline.serving.describe import Describer, draw, region_proposer
    from densevse.pipeline.shardset import iter_samples
    from densevse.pipeline.trained import CAPTIONER, best_path, load_trained

    ck = best_path(cfg.run.output_dir, CAPTIONER)
    if not ck.is_file():
        return []
    propose, note = region_proposer(cfg)
    d = Describer(cfg, load_trained(ck, CAPTIONER), propose, note)
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


def write_report(cfg, summary: dict) -> storage.Location:
    """<output_dir>/report/report.html from the run's summary ({"train", "evaluate"}) and its saved history."""
    report = cfg.run.output_dir / "report"
    with storage.local(report, download=False, upload=True) as out:
        _write(cfg, summary, out)
    return report / "report.html"


def _write(cfg, summary: dict, out: Path) -> None:
    """The report's files, in the local dir `out`."""
    from densevse.pipeline.shardset import shard_paths
    from densevse.pipeline.trained import best_path, checkpoint_file, summary_path

    out.mkdir(parents=True, exist_ok=True)
    ev = summary.get("evaluate") or {}
    hist_file = summary_path(cfg.run.output_dir, cfg.train.model)
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
    checkpoint = checkpoint_file(ev.get("checkpoint") or best_path(cfg.run.output_dir, cfg.train.model))
    if paths and checkpoint.is_file():
        parts += _figures("Test images: each proposal with the caption phrase it matched best",
                          _matched_images(cfg, checkpoint, paths, out))
    if paths:
        parts += _figures("Captioner: generated caption and dense description", _captioned_images(cfg, paths, out))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}.grid{display:flex;flex-wrap:wrap;gap:1em}"
             "figure{width:260px;margin:0}figure img{width:260px}figcaption{font-size:12px}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset=utf-8><title>DenseVSE report</title>"
                                     f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
