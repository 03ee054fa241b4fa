"""Checkpoints are loaded with torch.load(weights_only=True): a crafted file that would run code when unpickled
is refused with a clear error, by the library and by the commands that take a checkpoint path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densevse.models.checkpoint import UnsafeCheckpointError, load_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pt"
    torch.save({"model_name": "hmlstm", "hparams": {}, "state_dict": {}, "vocab": [], "labels": [],
                "payload": _RunsCode(marker)}, path)
    return path, marker


def test_crafted_checkpoint_is_refused_and_runs_nothing(crafted):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*model.pt.*posix.system"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_model(path)
    assert not marker.exists()


def test_plain_checkpoints_load_including_numpy_hparams(tmp_path):
    """Checkpoints written before hparams dropped the GloVe init hold a numpy array: still plain data."""
    path = tmp_path / "old.pt"
    torch.save({"hparams": {"word_init": np.ones((3, 2), np.float32)}, "w": torch.zeros(2)}, path)
    ck = load_checkpoint(path)
    assert ck["hparams"]["word_init"].shape == (3, 2) and ck["w"].shape == (2,)


@pytest.mark.parametrize("argv", [["evaluate", "--checkpoint", "{ck}"], ["describe", "--model", "{ck}", "{img}"]])
def test_commands_refuse_a_crafted_checkpoint_in_one_line(crafted, tmp_path, argv):
    from PIL import Image

    path, marker = crafted
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    cmd = [sys.executable, "-m", "densevse.pipeline.cli", *(a.format(ck=path, img=img) for a in argv),
           "-s", "stages.regions.impl=gold_boxes", "-s", "stages.regions.params={}",
           "-s", f"run.output_dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "refused to load" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
