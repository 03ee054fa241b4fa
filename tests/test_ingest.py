"""Ingest and image decoding as pure functions (no Ray): bad input becomes a recorded rejection with a reason."""
import io
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from densevse.stages.base import INGEST, Reject, batch_to_rows, empty_row, rows_to_batch
from densevse.stages.images import decode_rgb, read_bytes, to_array
from densevse.stages.ingest import check_caption


def test_torchvision_nms_works():
    """The registry torch/torchvision pair: a CPU-only torch wheel would fail here ("torchvision::nms")."""
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2] and torch.__version__.startswith("2.13.0")


def _png(mode: str, size=(40, 30), **info) -> bytes:
    img = Image.new(mode, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "CMYK" else "JPEG", **info)
    return buf.getvalue()


def _jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_odd_modes_become_rgb(mode):
    img, scale = decode_rgb(_png(mode))
    assert img.mode == "RGB" and img.size == (40, 30) and scale == 1.0


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out, _ = decode_rgb(buf.getvalue())
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_huge_image_is_downscaled_with_scale():
    img, scale = decode_rgb(_jpeg((2000, 1000)), max_side=500)
    assert img.size == (500, 250) and scale == 0.25


@pytest.mark.parametrize("data,reason", [
    (b"not an image at all", "not a decodable image"),
    (_jpeg()[:300], "corrupt image"),
])
def test_corrupt_and_truncated_images_are_rejected(data, reason):
    with pytest.raises(Reject, match=reason):
        decode_rgb(data)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(Reject, match="missing image file"):
        read_bytes(str(tmp_path / "nope.jpg"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(Reject, match="empty image file"):
        read_bytes(str(tmp_path / "empty.jpg"))


@pytest.mark.parametrize("text,reason", [
    ("", "empty caption"), ("   \t ", "empty caption"), ("... !!! 42", "no words"),
    (b"caf\xe9 au lait", "not valid UTF-8"), ("bad \ufffd char", "not valid UTF-8"),
    (" ".join(["word"] * 61), "61 words, over the limit of 60"), (None, "not text"),
])
def test_caption_rejections(text, reason):
    assert reason in check_caption(text, max_words=60)[1]


def test_caption_cleaning():
    assert check_caption("  A dog\x07 runs\n fast . ", 60) == ("A dog runs fast .", None)
    assert check_caption(" ".join(["word"] * 60), 60)[1] is None


def _row(tmp_path, name: str, data: bytes | None, captions, gold=None) -> dict:
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    return empty_row(key=name.split(".")[0], split="train", shard="train-000000", source=str(path),
                     captions=json.dumps(captions), gold=json.dumps(gold or {}))


def test_ingest_stage_records_every_outcome(tmp_path):
    rows = [
        _row(tmp_path, "good.jpg", _jpeg((1280, 960)), ["A dog .", "", "x" * 5 + " ok"], {"boxes": [[0, 0, 640, 480]]}),
        _row(tmp_path, "missing.jpg", None, ["A cat ."]),
        _row(tmp_path, "corrupt.jpg", _jpeg()[:200], ["A cat ."]),
        _row(tmp_path, "nocaps.jpg", _jpeg(), ["", "!!!"]),
    ]
    stage = INGEST.get("image_caption")({"max_side": 640})
    out = batch_to_rows(stage(rows_to_batch(rows)))  # the same adapter Ray Data calls
    by = {r["key"]: r for r in out}
    good = by["good"]
    assert good["reject"] == "" and (good["width"], good["height"]) == (640, 480)
    assert to_array(good["image"]).shape == (480, 640, 3)
    assert [c["index"] for c in json.loads(good["captions"])] == [0, 2]
    assert json.loads(good["caption_rejects"]) == [{"index": 1, "text": "", "reason": "empty caption"}]
    assert json.loads(good["gold"])["boxes"] == [[0, 0, 320, 240]]  # boxes follow the downscale
    assert by["missing"]["reject"].startswith("ingest: missing image file")
    assert by["corrupt"]["reject"].startswith("ingest: corrupt image")
    assert by["nocaps"]["reject"] == "ingest: no usable caption (empty caption)"
    assert len(out) == 4  # nothing dropped


def test_ingest_keeps_a_plain_jpeg_within_max_side_byte_for_byte(tmp_path):
    """No re-encode (CPU, and a generation of JPEG loss) for an RGB JPEG already within max_side; a downscaled,
    grayscale, PNG or EXIF-turned image is still re-encoded to an RGB JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG", exif=_turned_exif())
    turned = buf.getvalue()
    small, big, gray, png = _jpeg((64, 48)), _jpeg((1280, 960)), _png("L"), _png("RGB")
    rows = [_row(tmp_path, f"{k}.jpg", data, ["A dog ."])
            for k, data in (("small", small), ("big", big), ("gray", gray), ("png", png), ("turned", turned))]
    out = {r["key"]: r for r in INGEST.get("image_caption")({"max_side": 640}).process(rows)}
    assert out["small"]["image"] == small
    for k, orig in (("big", big), ("gray", gray), ("png", png), ("turned", turned)):
        r = out[k]
        assert r["reject"] == "" and r["image"] != orig, k
        with Image.open(io.BytesIO(r["image"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and (im.width, im.height) == (r["width"], r["height"])
    assert (out["turned"]["width"], out["turned"]["height"]) == (30, 40)  # turned by its EXIF orientation


def _turned_exif():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return exif
