"""The prepare step knows the project's own model dirs, which it trains on first use: the synthetic defaults
always, and pipeline.real.yaml's COCO detector and GUM parser where ../shared/data holds their training data;
any other path is a user's model, only checked."""
from pathlib import Path

from conftest import needs_coco, needs_gum
from densevse.pipeline.config import load_config
from densevse.pipeline.preprocess.prepare import own_detector_spec, own_parser_treebank


def test_synthetic_defaults_are_own_models_and_other_paths_are_not(tmp_path):
    assert own_detector_spec(".cache/detector-synthetic").dataset == "synthetic"
    assert own_detector_spec(str(tmp_path / "my-detector")) is None
    assert own_parser_treebank(".cache/parser/stanza-synthetic") is None
    assert own_parser_treebank(str(tmp_path / "my-parser")) is False


@needs_coco
@needs_gum
def test_the_real_preset_names_own_models_trained_on_shared_data():
    cfg = load_config("pipeline.real.yaml")
    spec = own_detector_spec(cfg.stages.regions.params.config)
    assert spec is not None and spec.dataset == "coco" and spec.device == "cpu" and spec.iters == 375
    assert Path(own_parser_treebank(cfg.stages.parse.params.model_dir)).name == "gum"
    large = own_detector_spec(".cache/detector-coco-large")  # the GPU recipe has a dir of its own
    assert large.device == "cuda" and large.freeze_stages == 3
