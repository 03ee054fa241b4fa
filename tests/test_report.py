"""report.html: the pure parts fast; a tiny real run's report (and console) checked in a headless browser (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from densevse.pipeline.config import parse_config
from densevse.pipeline.report import write_report
from densevse.pipeline.tracking.figures import region_phrases
from tests.shard_fixture import write_fixture_shards

CHROMIUM = "/usr/bin/chromium"


def test_region_phrases_picks_each_regions_best_phrase_of_its_own_image():
    scores = np.zeros((3, 2, 3), np.float32)  # phrases 0, 1 of image 0's caption, phrase 2 of image 1's
    scores[1, 0, 1] = scores[0, 0, 2] = 1.0
    scores[2, 0, :] = 9.0  # image 1's phrase never labels image 0's regions
    out = region_phrases(scores, caption_image=[0, 1], phrase_caption=[0, 0, 1],
                         cand=[[False, True, True], [True, True, False]], phrase_text=["a", "b", "c"])
    assert out == [[(1, "b"), (2, "a")], [(0, "c"), (1, "c")]]


def test_report_has_the_table_curves_and_matched_regions(tmp_path):
    """An (untrained) embedding model's report on fixture shards: every image it names exists and is a PNG."""
    import torch

    from densevse.models import new_embedding_model
    from densevse.pipeline.training.data import build_vocabs

    shards = write_fixture_shards(tmp_path / "shards", n_train=10, n_val=10, n_test=10)
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "run")}, "shards": {"dir": str(shards)},
                        "train": {"embed_dim": 16, "hidden_dim": 16, "word_vectors": "random"}})
    vocab, labels = build_vocabs(sorted(shards.glob("train-*.tar")))
    m = new_embedding_model(cfg.train.model, cfg.train, vocab_size=len(vocab), n_labels=len(labels), feat_dim=32,
                            word_init=None)
    best = tmp_path / "run" / "models" / cfg.train.model / "best.pt"
    best.parent.mkdir(parents=True)
    torch.save({"model_name": cfg.train.model, "hparams": m.hparams, "state_dict": m.state_dict(),
                "vocab": vocab.words, "labels": labels.words, "epoch": 0}, best)
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_i2t_r1": 10.0 * e, "val_t2i_r1": 9.0 * e}
               for e in range(3)]
    (tmp_path / "run" / f"train-{cfg.train.model}.json").write_text(json.dumps({"history": history}))
    page = write_report(cfg, {"evaluate": {"i2t_r1": 12.5, "t2i_r1": 11.0, "i2t_medr": 4.0, "split": "test"}})
    text = page.read_text()
    assert '<table id="recall">' in text and "<td>12.5</td>" in text and "<td>4</td>" in text
    imgs = [s.split('"')[0] for s in text.split('<img src="')[1:]]
    assert imgs == ["loss.png", "recall.png", *[f"matched-{i}.png" for i in range(4)]]  # no captioner: no captions
    assert all((page.parent / i).read_bytes()[:4] == b"\x89PNG" for i in imgs)
    assert "a blue circle is left of a blue triangle" in text  # the test images' captions under them


@pytest.mark.slow
def test_tiny_run_console_log_and_report_in_a_browser(tiny_run):
    from playwright import sync_api  # a dev dependency: missing is a failure, not a skip

    cfg, _ = tiny_run
    out = Path(cfg.run.output_dir)
    console = (out.parent / "console.txt").read_text()
    lines = console.splitlines()
    assert "Failed to query Ray Train Controller" not in console and "To avoid out-of-memory errors" not in console
    assert len(lines) < 40, console
    assert lines[-1] == lines[-1][0] * len(lines[-1]) and "image->text" in console and "text->image" in console
    assert "train      epoch 2/2" in console and "preprocess" in console
    log = (out / "run.log").read_text()
    assert len(log.splitlines()) > 2 * len(lines) and "densevse.preprocess" in log  # the full log: Ray's too
    assert json.loads((out / "summary.json").read_text())["evaluate"]["i2t_r1"] >= 0

    report = out / "report" / "report.html"
    assert Path(CHROMIUM).is_file(), f"no {CHROMIUM}: setup.sh installs Debian's chromium"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(report.as_uri())
            page.wait_for_function("() => [...document.images].every(i => i.complete)")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) >= 3 and all(w > 0 for w in widths), widths
            assert page.locator("#recall tr").count() == 3
            assert page.locator("figure img[src^=matched]").count() >= 1
            page.screenshot(path=str(out / "report" / "screenshot.png"), full_page=True)
        finally:
            browser.close()
