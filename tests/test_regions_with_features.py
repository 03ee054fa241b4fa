"""The combined regions+features stage (stages/regions_with_features.py): the detectron2 stage's boxes and, from the
same forward pass, the features the separate efficientnet_lite0 stage computes; the shard format unchanged."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from densevse.stages import FEATURES, REGIONS
from densevse.stages.base import empty_row, npy_bytes, npy_load


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _rows(n: int = 2) -> list[dict]:
    from densevse.pipeline.datasets.synthetic import make_image

    rows = []
    for i in range(n):
        img, _ = make_image(77, i, 224, n_captions=1)
        rows.append(empty_row(key=f"s{i}", image=_jpeg(img), width=224, height=224))
    return rows


@pytest.fixture(scope="module")
def stages(detector_dir):
    p = {"config": str(detector_dir), "top_k": 5, "score_thresh": 0.0, "threads": 1}
    return (REGIONS.get("detectron2")(p), FEATURES.get("efficientnet_lite0")({"input_size": 224, "threads": 1}),
            REGIONS.get("detectron2_features")(p))


def test_boxes_and_feats_match_the_separate_stages(stages):
    """224-px images: the detector's input is the features stage's at input_size=224, so one pass gives the same
    boxes and (to float16 rounding) the same 1280-d features, row 0 the whole image."""
    regions, features, combined = stages
    separate = features.process(regions.process(_rows()))
    both = combined.process(_rows())
    for s, c in zip(separate, both):
        assert s["reject"] == c["reject"] == ""
        assert s["boxes"] == c["boxes"]  # identical .npy bytes
        b, fs, fc = npy_load(c["boxes"]), npy_load(s["feats"]), npy_load(c["feats"])
        np.testing.assert_allclose(b[0], [0, 0, 224, 224])
        assert fc.dtype == fs.dtype == np.float16 and fc.shape == fs.shape == (len(b), 1280)
        np.testing.assert_allclose(fc.astype(np.float32), fs.astype(np.float32), rtol=0.02, atol=0.02)


def test_other_sizes_bad_rows_and_featurize(stages):
    """A non-square image (resized and padded by the detector): one feature row per box, finite; a bad image is
    rejected alone; `featurize` (given boxes, no detection) agrees with the detect pass."""
    _, _, combined = stages
    wide = Image.fromarray(np.asarray(Image.open(io.BytesIO(_rows(1)[0]["image"]))).repeat(2, axis=1))
    rows = [empty_row(key="wide", image=_jpeg(wide), width=448, height=224),
            empty_row(key="bad", image=b"not an image", width=1, height=1), *_rows(1)]
    out = combined.process(rows)
    assert out[1]["reject"].startswith("regions: ") and out[1]["feats"] == b""
    for r in (out[0], out[2]):
        b, f = npy_load(r["boxes"]), npy_load(r["feats"])
        assert r["reject"] == "" and f.shape == (len(b), 1280) and np.isfinite(f.astype(np.float32)).all()
    np.testing.assert_allclose(npy_load(out[0]["boxes"])[0], [0, 0, 448, 224])
    again = combined.featurize([empty_row(key="w", image=rows[0]["image"], width=448, height=224,
                                          boxes=out[0]["boxes"]),
                                empty_row(key="nobox", image=rows[0]["image"], boxes=npy_bytes(np.zeros((0, 4))))])
    np.testing.assert_allclose(npy_load(again[0]["feats"]).astype(np.float32),
                               npy_load(out[0]["feats"]).astype(np.float32), rtol=0.02, atol=0.02)
    assert again[1]["reject"].startswith("regions: boxes must be")


def test_from_regions_checks_feats_and_the_config_pairs_them(tmp_path):
    from densevse.pipeline.config import load_config

    fr = FEATURES.get("from_regions")()
    boxes = npy_bytes(np.zeros((2, 4), np.float32))
    ok = empty_row(key="a", boxes=boxes, feats=npy_bytes(np.zeros((2, 8), np.float16)))
    rows = fr.process([ok, empty_row(key="b", boxes=boxes), empty_row(key="c", boxes=boxes,
                                                                      feats=npy_bytes(np.zeros((3, 8), np.float16)))])
    assert [r["reject"][:14] for r in rows] == ["", "features: no f", "features: feat"]
    cfg = load_config("pipeline.yaml", ["stages.regions.impl=detectron2_features", "stages.features.impl=from_regions",
                                        "stages.features.params={}"])
    assert FEATURES.get(cfg.stages.features.impl).passthrough and cfg.stages.regions.params.roi_size == 3
    with pytest.raises(ValueError, match="features.impl: from_regions .* detectron2_features"):
        load_config("pipeline.yaml", ["stages.features.impl=from_regions", "stages.features.params={}"])


def test_describe_uses_the_combined_stage(detector_dir):
    """`densevse describe` with the combined config: boxes from its detector, features from its featurize."""
    from types import SimpleNamespace

    from densevse.pipeline.config import load_config
    from densevse.pipeline.serving.describe import Describer, region_proposer

    cfg = load_config("pipeline.yaml", ["stages.regions.impl=detectron2_features", "stages.features.impl=from_regions",
                                        "stages.features.params={}", f"stages.regions.params.config={detector_dir}",
                                        "stages.regions.params.score_thresh=0", "stages.regions.params.threads=1"])
    propose, note = region_proposer(cfg)
    jpeg = _rows(1)[0]["image"]
    boxes = propose([jpeg])[0]
    assert note == "" and boxes.ndim == 2 and len(boxes) >= 1
    d = Describer(cfg, SimpleNamespace(model=SimpleNamespace(hparams={"feat_dim": 1280})), propose)
    feats = d.featurize(jpeg, 224, 224, boxes[:3])
    assert feats.shape == (4, 1280) and feats.dtype == np.float32


def test_orchestrator_leaves_the_passthrough_stage_out():
    from densevse.pipeline.config import load_config
    from densevse.pipeline.preprocess.run import run_stages

    assert list(run_stages(load_config("pipeline.yaml"))) == ["ingest", "regions", "features", "parse"]
    cfg = load_config("pipeline.yaml", ["stages.regions.impl=detectron2_features", "stages.features.impl=from_regions",
                                        "stages.features.params={}"])
    assert list(run_stages(cfg)) == ["ingest", "regions", "parse"]


def test_detector_backbone_keeps_the_imagenet_batchnorm_statistics(tmp_path):
    """The backbone's stage-finding dry run once ran in training mode and moved every BatchNorm's running
    statistics: the 'frozen ImageNet' backbone was not the ImageNet network the features stage runs."""
    import torch
    from detectron2.modeling import build_model

    from densevse.models.efficientnet import default_weights
    from densevse.pipeline.stage_models.detector import DetectorSpec, build_cfg

    bu = build_model(build_cfg(DetectorSpec(), tmp_path)).backbone.bottom_up
    ref = torch.load(default_weights(), map_location="cpu", weights_only=True)
    assert torch.equal(bu.stem[1].running_var, ref["_bn0.running_var"])
    assert torch.equal(bu.blocks[-1]._bn2.running_mean, ref[f"_blocks.{len(bu.blocks) - 1}._bn2.running_mean"])


@pytest.mark.slow
def test_preprocess_with_one_backbone_pass_writes_the_usual_shards(tmp_path, detector_dir):
    """A real local Ray run with the combined config: three stages run (features left out), and every sample's
    shard entry has the default format: jpg, float32 (R, 4) boxes with row 0 the whole image, float16 (R, 1280)
    feats; training reads its feature dimension from them."""
    import ray
    import webdataset as wds

    from densevse.pipeline.config import load_config
    from densevse.pipeline.preprocess.run import preprocess
    from densevse.pipeline.shardset import shard_paths
    from densevse.pipeline.training.embedding import EmbeddingTask

    cfg = load_config("pipeline.yaml", [
        "dataset.synthetic.num_images=24", "dataset.synthetic.test_images=8", "shards.samples_per_shard=8",
        f"run.output_dir={tmp_path}", "ray.num_cpus=2", "stages.regions.impl=detectron2_features",
        f"stages.regions.params.config={detector_dir}", "stages.regions.params.score_thresh=0",
        "stages.regions.params.top_k=5", "stages.features.impl=from_regions", "stages.features.params={}",
        "stages.parse.impl=gold_trees", "stages.parse.params={}", "train.word_vectors=random"])
    try:
        summary = preprocess(cfg, progress=False)
    finally:
        ray.shutdown()
    assert summary["shards_written"] == summary["shards"] > 0
    n = 0
    for path in [p for split in ("train", "val", "test") for p in shard_paths(cfg.shard_dir, split)]:
        for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            assert {"jpg", "boxes.npy", "feats.npy", "json"} <= set(s)
            boxes, feats = npy_load(s["boxes.npy"]), npy_load(s["feats.npy"])
            assert boxes.dtype == np.float32 and feats.dtype == np.float16
            assert feats.shape == (len(boxes), 1280) and 2 <= len(boxes) <= 6
            np.testing.assert_allclose(boxes[0], [0, 0, 224, 224])
            n += 1
    assert n == summary["samples"] == 24  # none rejected
    task = EmbeddingTask(cfg)
    task.prepare(cfg, shard_paths(cfg.shard_dir, "train"), None)
    assert task.feat_dim == 1280


def test_serving_runs_and_bundles_the_combined_stages(detector_dir):
    """The embedder's image path (ingest -> regions -> features) with the combined config, and the model files a
    registered model carries: the detector and the head's ImageNet weights."""
    from densevse.pipeline.config import load_config
    from densevse.pipeline.serving.embedder import Embedder, bundled_paths

    cfg = load_config("pipeline.yaml", ["stages.regions.impl=detectron2_features", "stages.features.impl=from_regions",
                                        "stages.features.params={}", f"stages.regions.params.config={detector_dir}",
                                        "stages.regions.params.score_thresh=0", "stages.regions.params.threads=1"])
    stages = {name: (sc.impl, sc.params) for name, sc in cfg.stages}
    assert {"regions.config", "regions.head_weights"} <= set(bundled_paths(stages))
    e = Embedder.__new__(Embedder)
    e.stages, e._built = stages, {}
    rows = e.image_rows([_rows(1)[0]["image"]])
    assert rows[0]["reject"] == "" and npy_load(rows[0]["feats"]).shape == (len(npy_load(rows[0]["boxes"])), 1280)
