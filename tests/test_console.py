"""The console: the final table and progress lines (pure), and a Console routing output to run.log."""
from __future__ import annotations

import logging
import os
import sys

from densevse.pipeline.console import MARK, Console, progress_line, summary_table
from densevse.pipeline.report import recall_table_html

EV = {"i2t_r1": 32.9, "i2t_r5": 70.1, "i2t_r10": 84.0, "i2t_medr": 2.0, "t2i_r1": 34.3, "t2i_r5": 71.0,
      "t2i_r10": 85.5, "t2i_medr": 2.0, "grounding_acc": 90.0, "grounding_chance": 21.0,
      "proposal_recall_at_0.5": 0.8, "split": "test", "n_images": 1000, "model": "hmlstm", "epoch": 9,
      "seconds": 12.0}


def test_summary_table_has_recalls_grounding_times_and_paths():
    best = {"epoch": 8, "train_loss": 0.25, "val_i2t_r1": 30.0}
    t = summary_table({"preprocess": {"seconds": 656}, "train": {"seconds": 252, "epochs": 10, "best": best},
                       "evaluate": EV,
                       "paths": {"shards": "/o/shards", "mlflow": "run abc at http://x", "report": None}})
    lines = t.splitlines()
    assert lines[0] == lines[-1] and set(lines[0]) == {"="}
    assert "  32.9   70.1   84.0      2" in lines[2] and "34.3" in lines[3]
    assert "phrase grounding  90.0 %" in t and "proposal recall @IoU 0.5  80.0 %" in t
    assert "best: epoch 9/10  loss 0.250  val R@1 i2t 30.0\n" in t and "model hmlstm, epoch 10)" in t
    assert "preprocess 10:56  train 4:12  evaluate 0:12" in t
    assert "shards:      /o/shards" in t and "mlflow:" in t and "report" not in t


def test_progress_lines():
    assert progress_line({"step": "preprocess", "done": 500, "total": 2000}, 10.0) == (
        "preprocess     500/2,000 samples  25.0%     50.0/s  ETA 0:30")
    line = progress_line({"step": "train", "epoch": 1, "epochs": 10, "train_loss": 0.51234, "val_i2t_r1": 12.34}, 65)
    assert line == "train      epoch 2/10  loss 0.512  val R@1 i2t 12.3  (1:05)"


def test_recall_table_html():
    h = recall_table_html(EV)
    assert h.startswith('<table id="recall">') and "<td>32.9</td>" in h and "<td>-</td>" not in h


def test_console_sends_detail_to_the_log_and_progress_to_the_console(tmp_path, capfd):
    log = tmp_path / "run.log"
    with Console(log, "normal") as con:
        print("ray noise")
        os.write(2, b"c++ noise\n")
        logging.getLogger("densevse.x").info("detail")
        logging.getLogger("densevse.x").warning("a real warning")
        for _ in range(2):  # Ray streams some workers' last lines twice, interleaved: each shown once
            print("(RayTrainWorker pid=1) " + MARK + '{"step": "train", "epoch": 0, "epochs": 2, "train_loss": 1.5}')
            print("(RayTrainWorker pid=1) " + MARK + '{"step": "train", "message": "early stop after epoch 0"}')
        con.print("TABLE")
    out, err = capfd.readouterr()
    assert "noise" not in out + err and "detail" not in out + err
    assert out.splitlines()[-1] == "TABLE" and out.count("epoch 1/2  loss 1.500") == 1 and "a real warning" in out
    assert out.count("early stop after epoch 0") == 1
    text = log.read_text()
    assert all(s in text for s in ("ray noise", "c++ noise", "detail", "a real warning", "TABLE"))
    print("after")  # the streams are restored
    assert capfd.readouterr().out == "after\n" and sys.stdout is not None


def test_console_moves_handlers_made_before_it_to_the_log(tmp_path, capsys):
    lg = logging.getLogger("test.console.early")
    h = logging.StreamHandler(sys.stderr)  # as Ray Data's handler, made at import with the then sys.stderr
    lg.addHandler(h)
    try:
        with Console(tmp_path / "run.log", "normal"):
            lg.warning("early handler")
        out, err = capsys.readouterr()
        assert "early handler" not in out + err and "early handler" in (tmp_path / "run.log").read_text()
        assert h.stream is sys.stderr  # given back
    finally:
        lg.removeHandler(h)
