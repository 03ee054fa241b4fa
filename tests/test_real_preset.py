"""The real-data preset (pipeline.real.yaml) end to end on a slice of the real files: a detector trained on real
COCO boxes and a parser trained on real GUM trees (a few iterations each, by the project's trainers), then
`densevse preprocess` of real Flickr8k photos through Ray and `densevse inspect`."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import FLICKR8K, ROOT, SHARED, gum_slice, needs_flickr8k, needs_gum

pytestmark = [pytest.mark.slow, needs_flickr8k, needs_gum,
              pytest.mark.skipif(not (SHARED / "coco-det" / "annotations").is_dir(),
                                 reason="../shared/data absent: coco-det")]
DENSEVSE = str(ROOT / ".venv" / "bin" / "densevse")


def test_real_preset_preprocesses_real_photos_with_real_models(tmp_path):
    from densevse.pipeline.stage_models.detector import DetectorSpec
    from densevse.pipeline.stage_models.detector import train as train_detector
    from densevse.pipeline.stage_models.parser import TrainSpec
    from densevse.pipeline.stage_models.parser import train as train_parser

    detector, parser = tmp_path / "detector", tmp_path / "parser"
    train_detector(detector, DetectorSpec(dataset="coco", roots=[str(SHARED / "coco-det"), str(SHARED / "coco-mini")],
                                          iters=2, ims_per_batch=1, num_images=8, eval_images=0, input_size=320),
                   quiet=True)
    train_parser(parser, TrainSpec.for_treebank(str(gum_slice(tmp_path / "gum", 20)), tagger_steps=10,
                                                parser_epochs=1))
    out = tmp_path / "run"
    sets = [f"run.output_dir={out}", "dataset.limit=3", f"dataset.root={FLICKR8K}", "shards.samples_per_shard=4",
            f"stages.regions.params.config={detector}", "stages.regions.params.score_thresh=0",
            f"stages.parse.params.model_dir={parser}", "ray.num_cpus=2"]
    args = [a for s in sets for a in ("-s", s)]
    r = subprocess.run([DENSEVSE, "preprocess", "pipeline.real.yaml", "--quiet", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([DENSEVSE, "inspect", "pipeline.real.yaml", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.split("==\n", 1)[1])
    assert set(summary) == {"train", "val", "test"}
    for split in summary.values():
        assert split["n_ok"] + split["n_rejected"] == split["n_planned"] == 3
        # row 0 (the whole image) + the real detector's proposals (score_thresh 0: even barely trained, it proposes)
        assert 1 < split["regions_per_image"] <= 20
        assert split["phrases_per_caption"] > 0 and split["n_phrases"] > 0
