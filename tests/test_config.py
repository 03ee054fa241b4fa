"""pipeline.yaml validation: bad keys and types fail up front, naming the key; overrides work."""
from pathlib import Path

import pytest

from densevse.pipeline.errors import ConfigError
from densevse.pipeline.config import apply_override, dump_config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_repo_config_is_valid_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "pipeline.yaml")
    assert cfg.dataset.kind == "synthetic" and cfg.shards.samples_per_shard > 0
    (tmp_path / "again.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize("override,named", [
    ("dataset.synthetic.num_imgs=5", "dataset.synthetic.num_imgs"),
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("dataset.kind=imagenet", "dataset.kind"),
    ("stages.features.impl=nope", "stages.features.impl"),
    ("stages.ingest.params.max_side=-1", "stages.ingest.params.max_side"),
    ("stages.ingest.params.bogus=1", "stages.ingest.params.bogus"),
    ("stages.regions.num_cpus=0", "stages.regions.num_cpus"),
    ("shards.samples_per_shard=0", "shards.samples_per_shard"),
    ("nonsense.x=1", "nonsense"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "pipeline.yaml", [override])
    assert named in str(e.value)


def test_impl_of_another_step_is_unknown():
    """Each step looks its impl up in its own registry: a regions impl named as the parse stage fails."""
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "pipeline.yaml", ["stages.parse.impl=gold_boxes"])
    assert "parse.impl: unknown parse stage 'gold_boxes'; known: ['gold_trees', 'stanza']" in str(e.value)


def test_every_stage_is_registered_under_its_own_step():
    """A stage's `name` (the prefix of its rejection reasons and cost entries) is the step it is registered in."""
    from densevse.stages import STEPS

    assert list(STEPS) == ["ingest", "regions", "features", "parse"]
    for step, registry in STEPS.items():
        assert registry.names() and {registry.get(impl).name for impl in registry.names()} == {step}


def test_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "pipeline.yaml", ["train.epochs=3", "dataset.splits=[train, test]",
                                               "mlflow.tracking_uri=null", "train.lr=0.01"])
    assert cfg.train.epochs == 3 and cfg.dataset.splits == ["train", "test"] and cfg.train.lr == 0.01
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"train": 3}, "train.epochs=1")


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_defaults_fill_missing_sections():
    cfg = parse_config({"run": {"output_dir": "/tmp/x"}})
    assert cfg.shard_dir == Path("/tmp/x/shards") and cfg.dataset_root == Path("/tmp/x/dataset")


def test_cli_exits_2_naming_the_key(capsys):
    from densevse.pipeline.cli.main import main

    assert main(["config", str(ROOT / "pipeline.yaml"), "-s", "train.epochz=3"]) == 2
    assert "train.epochz" in capsys.readouterr().err


def test_local_tracking_uris_made_absolute_for_workers(tmp_path, monkeypatch):
    """Ray Train workers run in another directory: relative local MLflow stores must reach them absolute."""
    from densevse.pipeline.config import load_config
    from densevse.pipeline.tracking.server import absolute_uri
    from densevse.pipeline.training.loop import for_workers

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("file:mlruns") == f"file:{tmp_path}/mlruns"
    assert absolute_uri("mlruns") == str(tmp_path / "mlruns")
    for remote in ("http://127.0.0.1:5000", "databricks", "file:///abs/mlruns", None):
        assert absolute_uri(remote) == remote
    cfg = for_workers(load_config(None, ["run.output_dir=out", "mlflow.tracking_uri=sqlite:///m.db"]))
    assert cfg.run.output_dir == tmp_path / "out" and cfg.shards.dir == tmp_path / "out" / "shards"
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/m.db"
