"""The detector on real COCO boxes: the reader (merge, dedupe, held-out set, every bad-input reason), the grid
baseline, the recall / AR metric, the cache key, the Lite2 backbone; and (slow) a few real training iterations
on the shared photos, loaded back through the regions stage. Quality figures come from bench/bench_proposals.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED
from densevse.pipeline.errors import DatasetError
from densevse.pipeline.stage_models import coco_boxes as cb

COCO_DET, COCO_MINI = SHARED / "coco-det", SHARED / "coco-mini"
needs_coco_det = pytest.mark.skipif(not (COCO_DET / "annotations").is_dir() or not (COCO_MINI / "annotations").is_dir(),
                                    reason="../shared/data absent: coco-det, coco-mini")


CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _root(base: Path, name: str, splits: dict[str, tuple[list, list]]) -> Path:
    """A COCO root: annotations/instances_<split>.json + a JPEG per listed image (sizes as listed)."""
    root = base / name
    (root / "annotations").mkdir(parents=True)
    for split, (images, anns) in splits.items():
        (root / "images" / split).mkdir(parents=True)
        for im in images:
            if isinstance(im, dict):
                Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(root / "images" / split /
                                                                                   im["file_name"])
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": CATEGORIES}))
    return root


def _im(i, w=100, h=80):
    return {"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h}


def _ann(i, bbox, crowd=0, cat=1):
    return {"image_id": i, "bbox": bbox, "iscrowd": crowd, "category_id": cat}


@pytest.fixture()
def roots(tmp_path):
    det = _root(tmp_path, "coco-det", {
        "train2017": ([_im(1), _im(2), _im(3), _im(4), _im(5), _im(6), "junk"], [
            _ann(1, [10, 10, 20, 20]),            # good
            _ann(1, [90, 70, 30, 30]),            # partly outside: clipped to [90, 70, 100, 80]
            _ann(1, [200, 10, 5, 5]),             # fully outside
            _ann(1, [10, 10, 0, 5]),              # zero area
            _ann(1, [10, 10, "w", 5]),            # malformed
            _ann(2, [0, 0, 50, 50], crowd=1),     # crowd only: image 2 has no usable box
            _ann(3, [5, 5, 10, 10]),              # image 3: file missing (removed below)
            _ann(4, [5, 5, 10, 10]),              # image 4: file corrupt
            _ann(5, [5, 5, 10, 10]),              # image 5: stored at another size than listed
            _ann(6, [1, 2, 3, 4], cat=3),
            _ann(99, [1, 1, 5, 5]),               # no such image listed
            {"bbox": [1, 1, 2, 2]},               # no image id
        ]),
        "val2017": ([_im(10), _im(11)], [_ann(10, [0, 0, 40, 40]), _ann(11, [5, 5, 20, 20]),
                                         _ann(11, [0, 0, 90, 70], crowd=1)]),
    })
    (det / "images" / "train2017" / _im(3)["file_name"]).unlink()
    (det / "images" / "train2017" / _im(4)["file_name"]).write_bytes(b"not a jpeg")
    Image.new("RGB", (64, 64)).save(det / "images" / "train2017" / _im(5)["file_name"])
    mini = _root(tmp_path, "coco-mini", {
        "train2017": ([_im(1), _im(20)], [_ann(1, [0, 0, 5, 5]), _ann(20, [3, 3, 30, 30])]),  # id 1: duplicate
        "val2017": ([_im(10)], [_ann(10, [0, 0, 40, 40])]),                                   # id 10: held out
    })
    return det, mini


def test_reader_merges_dedupes_holds_out_and_reports_every_skip(roots):
    from detectron2.structures import BoxMode

    data = cb.read_coco_boxes(roots)
    assert [d["image_id"] for d in data.train] == [1, 6, 20]
    assert [d["image_id"] for d in data.holdout] == [10, 11]
    one = data.train[0]
    assert one["file_name"].endswith("coco-det/images/train2017/000000000001.jpg")
    assert (one["width"], one["height"]) == (100, 80)
    assert [a["bbox"] for a in one["annotations"]] == [[10, 10, 30, 30], [90, 70, 100, 80]]  # XYXY, clipped
    assert {a["bbox_mode"] for d in data.train for a in d["annotations"]} == {BoxMode.XYXY_ABS}
    assert {a["category_id"] for d in data.train for a in d["annotations"]} == {0}  # class-agnostic
    assert [a["bbox"] for a in data.holdout[1]["annotations"]] == [[5, 5, 25, 25]]  # crowd is not gold
    assert data.report == {cb.CLIPPED: 1, cb.OUTSIDE: 1, cb.ZERO_AREA: 1, cb.BAD_BOX: 2, cb.CROWD: 2,
                           cb.NO_BOXES: 1, cb.MISSING: 1, cb.UNREADABLE: 1, cb.SIZE: 1, cb.NO_IMAGE_ENTRY: 1,
                           cb.BAD_IMAGE: 1, cb.DUPLICATE: 1, cb.HELD_OUT: 1}
    # the root order decides which copy of a duplicate is read, never whether a held-out id is trained on
    flipped = cb.read_coco_boxes(roots[::-1])
    assert [d["image_id"] for d in flipped.train] == [1, 6, 20] and flipped.train[0]["file_name"].count("coco-mini")
    assert [d["image_id"] for d in flipped.holdout] == [10, 11]
    # COCO's categories, one class each in sorted id order
    cats = cb.read_coco_boxes(roots, classes="coco")
    assert cats.categories == [1, 3] and [a["category_id"] for a in cats.train[1]["annotations"]] == [1]


def test_reader_fails_up_front_on_a_malformed_file_or_an_empty_root(roots, tmp_path):
    det, mini = roots
    bad = det / "annotations" / "instances_val2017.json"
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        cb.read_coco_boxes([det, mini])
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        cb.read_coco_boxes([det])
    with pytest.raises(DatasetError, match="nowhere"):
        cb.read_coco_boxes([tmp_path / "nowhere"])


def test_reader_refuses_an_image_path_that_climbs_out(tmp_path):
    """As the dataset readers do: a hostile file_name stops the read, naming the annotation file."""
    root = _root(tmp_path, "coco-x", {"train2017": ([_im(1)], [])})
    f = root / "annotations" / "instances_train2017.json"
    d = json.loads(f.read_text())
    d["images"][0]["file_name"] = "../../../../etc/passwd"
    f.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match="instances_train2017.json.*leaves the dataset folder"):
        cb.read_coco_boxes([root], holdout="coco-x/val2017")


def test_fingerprint_follows_the_files_not_the_spelling(roots, monkeypatch):
    det, mini = roots
    fp = cb.fingerprint([det, mini])
    monkeypatch.chdir(det.parent)
    assert cb.fingerprint(["coco-det", "./coco-mini/"]) == fp
    (det / "annotations" / "instances_val2017.json").write_text((det / "annotations" / "instances_val2017.json")
                                                                 .read_text().replace("40", "41"))
    fp2 = cb.fingerprint([det, mini])
    Image.new("RGB", (8, 8)).save(mini / "images" / "val2017" / "extra.jpg")
    assert len({fp, fp2, cb.fingerprint([det, mini])}) == 3


def test_spec_cache_key_keeps_the_synthetic_hash():
    from densevse.pipeline.stage_models.detector import DetectorSpec, default_out, spec_hash

    assert spec_hash(DetectorSpec()) == "3c2986a760ad08b9"  # the hash before the coco fields: caches stay valid
    assert default_out(DetectorSpec()) == Path(".cache/detector-synthetic")
    coco = DetectorSpec(dataset="coco", roots=["a"])
    assert coco.input_size == 448 and coco.num_images is None and default_out(coco) == Path(".cache/detector-coco")
    assert default_out(coco.model_copy(update={"backbone": "efficientnet-lite2"})) == Path(".cache/detector-coco-lite2")
    with pytest.raises(ValueError, match="root"):
        DetectorSpec(dataset="coco", roots=[])
    with pytest.raises(ValueError, match="no roots"):
        DetectorSpec(roots=["a"])


def test_grid_baseline_order_and_shapes():
    from densevse.pipeline.evaluation.proposals import grid_boxes

    b = grid_boxes(640, 480)
    assert b.dtype == np.float32 and b.shape[1] == 4
    assert (b[:, :2] >= -1e-3).all() and (b[:, 2] <= 640 + 1e-3).all() and (b[:, 3] <= 480 + 1e-3).all()
    side = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    assert np.all(np.diff(side.round(2)) <= 0)  # coarse scales first
    assert sorted(set(side.round(1))) == pytest.approx([69.3, 138.6, 277.1], abs=0.1)  # 3 scales
    ratios = ((b[:, 3] - b[:, 1]) / (b[:, 2] - b[:, 0])).round(3)
    assert set(ratios) == {0.5, 1.0, 2.0}  # 3 aspect ratios
    centre = (b[:, :2] + b[:, 2:]) / 2 - [320, 240]
    d = np.hypot(*centre[side.round(1) == 277.1].T)
    assert np.all(np.diff(d) >= -1e-3)  # within a scale: centre-out
    assert len(grid_boxes(100, 100, scales=(0.5,), ratios=(1.0,))) == 9  # 50-px boxes every 25 px: 3 x 3
    assert len(grid_boxes(100, 100, scales=(2.0,), ratios=(1.0,))) == 1  # bigger than the image: clipped to it


def test_recall_table_on_hand_made_boxes():
    from densevse.models.metrics import recall_table

    gold = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), np.array([[0, 0, 100, 100]])]
    preds = [np.array([[50, 50, 60, 60], [0, 0, 10, 12], [20, 20, 40, 40]]),  # IoU 0.833 (2nd) and 1.0 (3rd)
             np.array([[0, 0, 100, 60]])]                                     # IoU 0.6
    r = recall_table(gold, preds, ks=(1, 2, 3), ious=(0.5, 0.7), ar_k=3)
    assert r["recall@0.5_top1"] == pytest.approx(1 / 3) and r["recall@0.5_top2"] == pytest.approx(2 / 3)
    assert r["recall@0.7_top2"] == pytest.approx(1 / 3) and r["recall@0.7_top3"] == pytest.approx(2 / 3)
    assert r["recall@0.5_top3"] == 1
    # AR over 0.5:0.95: gold 1 hit up to 0.8 (7 of 10 thresholds), gold 2 at all 10, gold 3 up to 0.6 (3)
    assert r["AR@3"] == pytest.approx((7 + 10 + 3) / 30)
    assert np.isnan(recall_table([np.zeros((0, 4))], [np.zeros((0, 4))])["recall@0.5_top19"])  # no gold
    assert recall_table(gold, [np.zeros((0, 4)), np.zeros((0, 4))])["AR@100"] == 0


def test_lite2_backbone_and_the_old_backbone_name_build():
    import torch
    from detectron2.modeling import build_backbone

    from densevse.pipeline.stage_models.detector import DetectorSpec, build_cfg

    cfg = build_cfg(DetectorSpec(dataset="coco", roots=["x"], backbone="efficientnet-lite2"), Path("unused"))
    assert cfg.MODEL.EFFICIENTNET.NAME == "efficientnet-lite2" and "lite2" in cfg.MODEL.EFFICIENTNET.PRETRAINED
    assert cfg.INPUT.MIN_SIZE_TRAIN == (392, 424, 456, 488) and cfg.INPUT.MIN_SIZE_TEST == 448  # the cpu recipe
    bottom_up = build_backbone(cfg).bottom_up
    assert bottom_up.output_shape()["s5"].channels == 352  # Lite2's last stage (Lite0: 320)
    with torch.no_grad():
        assert bottom_up(torch.zeros(1, 3, 64, 64))["s5"].shape[-1] == 2
    cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite0_fpn_backbone"  # a config saved before Lite2
    cfg.MODEL.EFFICIENTNET.NAME, cfg.MODEL.EFFICIENTNET.PRETRAINED = "efficientnet-lite0", ""
    assert build_backbone(cfg).bottom_up.output_shape()["s5"].channels == 320


def test_coco_recipe_follows_the_device_and_the_device_is_not_in_the_cache_key():
    from densevse.pipeline.stage_models.detector import COCO_RECIPES, DetectorSpec, build_cfg, spec_hash

    cpu, gpu = DetectorSpec(dataset="coco", roots=["x"]), DetectorSpec(dataset="coco", roots=["x"], device="cuda")
    assert (cpu.iters, cpu.ims_per_batch, cpu.input_size, cpu.freeze_stages) == (375, 8, 448, 5)
    assert (gpu.iters, gpu.freeze_stages, gpu.fpn_channels, gpu.box_head_dim) == (1300, 3, 128, 1024)
    assert spec_hash(cpu) != spec_hash(gpu)  # two recipes, two models
    same = DetectorSpec(dataset="coco", roots=["x"], device="cuda", workers=4, threads=2, **COCO_RECIPES["cpu"])
    assert spec_hash(same) == spec_hash(cpu)  # the cpu recipe trained on a GPU: the same cache key
    assert DetectorSpec(dataset="coco", roots=["x"], device="cuda", iters=7).iters == 7  # a given field wins
    assert cpu.loader_workers == 0 and 1 <= gpu.loader_workers <= 8
    cfg = build_cfg(gpu, Path("unused"))
    assert cfg.MODEL.DEVICE == "cuda" and cfg.DATALOADER.NUM_WORKERS == gpu.loader_workers
    assert cfg.MODEL.FPN.OUT_CHANNELS == 128 and cfg.MODEL.ROI_BOX_HEAD.FC_DIM == 1024


def test_cli_parses_the_coco_flags_and_reports_bad_roots(tmp_path, capsys):
    from densevse.pipeline.cli.main import build_parser, main

    args = build_parser().parse_args(["regions", "train", "--dataset", "coco", "--root", "a", "--root", "b",
                                      "--backbone", "efficientnet-lite2", "--input-size", "576"])
    assert (args.dataset, args.roots, args.backbone, args.input_size, args.out) == \
        ("coco", ["a", "b"], "efficientnet-lite2", 576, None)
    assert main(["regions", "train", "--dataset", "coco", "--root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["regions", "train", "--root", "x", "--out", str(tmp_path / "out")]) == 2  # roots need coco
    assert "no roots" in capsys.readouterr().err


@needs_coco_det
def test_real_shared_data_counts():
    data = cb.read_coco_boxes([COCO_DET, COCO_MINI])
    assert len(data.holdout) == 128 and len(data.train) == 282  # 126 + 80 + 79 - the 3 held-out ids
    assert not {d["image_id"] for d in data.train} & {d["image_id"] for d in data.holdout}
    assert data.report[cb.HELD_OUT] == 3 and data.report[cb.CROWD] == 23  # coco-mini's val lists 139, 802, 11813


@pytest.mark.slow
@needs_coco_det
def test_coco_detector_trains_a_few_iterations_and_loads_in_the_regions_stage(tmp_path, capsys):
    """The real path: COCO files -> DatasetMapper -> DefaultTrainer -> saved dir -> the pipeline's regions stage."""
    from densevse.pipeline.cli.main import main
    from densevse.stages import REGIONS
    from densevse.stages.base import empty_row, npy_load

    out = tmp_path / "det"
    argv = ["regions", "train", "--dataset", "coco", "--root", str(COCO_DET), "--root", str(COCO_MINI),
            "--iters", "4", "--ims-per-batch", "2", "--num-images", "8", "--eval-images", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "23  crowd box (skipped)" in printed and "grid" in printed and "R@0.5_top19" in printed
    ev = json.loads((out / "eval.json").read_text())
    assert ev["iters"] == 4 and ev["eval_images"] == 4 and ev["data"]["train_images"] == 8
    for r in (ev, ev["baselines"]["grid"]):
        assert all(0 <= r[k] <= 1 for k in ("recall@0.5_top19", "recall@0.7_top19", "recall@0.5_top100",
                                            "recall@0.7_top100", "AR@100"))
    assert json.loads((out / "metrics.json").read_text().splitlines()[-1])["iteration"] >= 3
    assert main(argv) == 0 and "cached (same spec)" in capsys.readouterr().out

    photo = sorted((COCO_DET / "images" / "val2017").glob("*.jpg"))[0]
    with Image.open(photo) as im:
        w, h = im.size
    stage = REGIONS.get("detectron2")({"config": str(out), "score_thresh": 0.0, "top_k": 19, "threads": 1})
    assert stage.cfg.MODEL.EFFICIENTNET.NAME == "efficientnet-lite0" and stage.cfg.INPUT.MIN_SIZE_TEST == 448
    row = stage.process([empty_row(key="p", image=photo.read_bytes(), width=w, height=h)])[0]
    assert row["reject"] == ""
    boxes = npy_load(row["boxes"])
    assert boxes.shape == (20, 4)  # the whole image + 19 proposals
    np.testing.assert_allclose(boxes[0], [0, 0, w, h])
    assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()


@pytest.mark.gpu
@needs_coco_det
def test_coco_detector_trains_on_the_gpu(tmp_path, capsys):
    """`densevse regions train --device cuda`: a few iterations of the cuda recipe on a tiny real slice."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from densevse.pipeline.cli.main import main

    out = tmp_path / "det"
    assert main(["regions", "train", "--dataset", "coco", "--root", str(COCO_DET), "--root", str(COCO_MINI),
                 "--device", "cuda", "--iters", "6", "--num-images", "16", "--eval-images", "8",
                 "--out", str(out)]) == 0
    assert "on cuda" in capsys.readouterr().out
    ev = json.loads((out / "eval.json").read_text())
    assert ev["device"] == "cuda" and ev["iters"] == 6 and ev["data"]["train_images"] == 16
    assert json.loads((out / "metrics.json").read_text().splitlines()[-1])["iteration"] >= 5
