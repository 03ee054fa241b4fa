"""Hostile input, written as real bad files: decompression bombs, oversized files, big JPEGs (draft mode),
EXIF orientation, annotation files whose image paths leave the dataset, and captions that are not UTF-8."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from densevse.pipeline.datasets import READERS
from densevse.pipeline.datasets import flickr30k_entities as f30k
from densevse.pipeline.errors import DatasetError
from densevse.pipeline.serving.describe import load_image
from densevse.stages.base import INGEST, Reject, empty_row
from densevse.stages.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_rgb, read_bytes, to_array
from densevse.stages.ingest import check_caption
from densevse.stages.text import BAD_UTF8


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) with one tiny IDAT: no real pixels behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _jpeg(a: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _ingest(tmp_path, name, data, gold=None, **params) -> dict:
    (tmp_path / name).write_bytes(data)
    row = empty_row(key=name.split(".")[0], source=str(tmp_path / name), captions=json.dumps(["A dog ."]),
                    gold=json.dumps(gold or {}))
    return INGEST.get("image_caption")(params).process([row])[0]


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("w,h,reason", [
    (20000, 20000, "image too large"),  # 400M: PIL's own guard (2x the limit) trips at open
    (9000, 8000, "9000x8000 = 72000000 pixels, over the limit of 64000000"),  # PIL would only warn here
])
def test_decompression_bomb_headers_are_rejected_undecoded(tmp_path, w, h, reason):
    with pytest.raises(Reject, match=reason):
        decode_rgb(_png_header(w, h))
    assert _ingest(tmp_path, "bomb.png", _png_header(w, h))["reject"].startswith("ingest: image too large")


def test_pixel_limit_is_exact_and_can_be_lowered(tmp_path):
    assert MAX_IMAGE_PIXELS == 64_000_000
    with pytest.raises(Reject, match="over the limit of 1000"):
        decode_rgb(_jpeg(np.zeros((40, 30, 3), np.uint8)), max_pixels=1000)
    assert decode_rgb(_jpeg(np.zeros((40, 25, 3), np.uint8)), max_pixels=1000)[0].size == (25, 40)


def test_files_over_the_byte_cap_are_rejected_unread(tmp_path):
    big = tmp_path / "big.jpg"
    with big.open("wb") as f:  # sparse: 32 MiB + 1 on paper, nothing on disk
        f.truncate(MAX_IMAGE_BYTES + 1)
    with pytest.raises(Reject, match=f"is {MAX_IMAGE_BYTES + 1} bytes, over the cap of {MAX_IMAGE_BYTES} bytes"):
        read_bytes(str(big))
    data = _jpeg(np.zeros((64, 64, 3), np.uint8))
    row = _ingest(tmp_path, "small.jpg", data, max_image_bytes=len(data) - 1)
    assert row["reject"] == f"ingest: image file {tmp_path / 'small.jpg'} is {len(data)} bytes, over the cap of " \
                            f"{len(data) - 1} bytes"


def test_big_jpeg_decodes_in_draft_mode_with_the_true_scale(tmp_path, monkeypatch):
    a = np.zeros((3000, 4000, 3), np.uint8)
    a[:, :2000] = (230, 20, 20)  # left half red, right half blue
    a[:, 2000:] = (20, 20, 230)
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):  # the real draft, recording what libjpeg was asked for and gave
        out = real_draft(self, mode, size)
        drafted.append((size, self.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    img, scale = decode_rgb(_jpeg(a), max_side=640)
    assert img.size == (640, 480) and scale == 0.16
    assert drafted == [((640, 480), (1000, 750))]  # decoded at 1/4, not at 4000x3000
    px = np.asarray(img)
    assert px[240, 100, 0] > 200 and px[240, 540, 2] > 200  # the halves are where they were
    row = _ingest(tmp_path, "big.jpg", _jpeg(a), gold={"boxes": [[2000, 0, 4000, 3000]]})
    assert (row["width"], row["height"]) == (640, 480)
    assert json.loads(row["gold"])["boxes"] == [[320.0, 0.0, 640.0, 480.0]]  # boxes follow the true scale


def _exif_6() -> tuple[bytes, np.ndarray]:
    """A landscape 60x40 JPEG (red block top-left) with EXIF orientation 6: viewers turn it 90 degrees clockwise."""
    a = np.full((40, 60, 3), 255, np.uint8)
    a[:20, :20] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(a, exif=exif.tobytes()), np.rot90(a, k=-1)


def test_exif_orientation_applied_without_gold_boxes_only(tmp_path):
    data, upright = _exif_6()
    turned = _ingest(tmp_path, "phone.jpg", data)
    assert (turned["width"], turned["height"]) == (40, 60)
    assert np.abs(to_array(turned["image"]).astype(int) - upright).mean() < 10  # red block now top-right
    stored = _ingest(tmp_path, "coco.jpg", data, gold={"boxes": [[0, 0, 20, 20]], "labels": ["x"]})
    assert (stored["width"], stored["height"]) == (60, 40)  # boxes are in stored pixels: left as stored
    assert json.loads(stored["gold"])["boxes"] == [[0, 0, 20, 20]]
    assert to_array(stored["image"])[5, 5, 0] > 200


def test_describe_loads_a_phone_photo_upright(tmp_path):
    data, _ = _exif_6()
    (tmp_path / "phone.jpg").write_bytes(data)
    assert load_image(tmp_path / "phone.jpg", max_side=640)[1:] == (40, 60)


# ---------------------------------------------------------------- dataset paths

def _karpathy(root, images: list[dict], raw: bytes | None = None):
    sents = [{"raw": "A dog .", "tokens": ["a", "dog"]}]
    doc = raw or json.dumps({"dataset": "flickr8k", "images": [{"split": "test", "sentences": sents, **i}
                                                               for i in images]}).encode()
    (root / "dataset_flickr8k.json").write_bytes(doc)
    return list(READERS.get("karpathy")(root))


@pytest.mark.parametrize("image,match", [
    ({"filename": "../../etc/passwd"}, r"dataset_flickr8k.json: image path '../../etc/passwd' leaves the dataset"),
    ({"filepath": "/etc", "filename": "passwd"}, r"dataset_flickr8k.json: image path '/etc' is absolute"),
    ({"filepath": "train2014", "filename": "/etc/passwd"}, r"image path '/etc/passwd' is absolute"),
    ({"filepath": "train2014", "filename": "../../../x.jpg"}, r"'train2014/../../../x.jpg' leaves the dataset"),
])
def test_karpathy_paths_must_stay_inside(tmp_path, image, match):
    with pytest.raises(DatasetError, match=match):
        _karpathy(tmp_path, [image])


def test_karpathy_harmless_dots_bom_and_bad_json(tmp_path):
    [spec] = _karpathy(tmp_path, [{"filepath": "train2014", "filename": "../val2014/a.jpg"}])
    assert spec["source"] == str(tmp_path / "images" / "val2014" / "a.jpg")
    doc = json.dumps({"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"raw": "A dog ."}]}]})
    assert len(_karpathy(tmp_path, [], raw=b"\xef\xbb\xbf" + doc.encode())) == 1  # a UTF-8 BOM is fine
    with pytest.raises(DatasetError, match="dataset_flickr8k.json: not valid JSON"):
        _karpathy(tmp_path, [], raw=b"{not json")


def _coco(root, file_name: str, captions: list[bytes]):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    anns = b", ".join(b'{"image_id": 1, "id": %d, "caption": "%s"}' % (i, c) for i, c in enumerate(captions))
    (root / "annotations" / "captions_val2017.json").write_bytes(
        b'{"images": [{"id": 1, "file_name": "%s"}], "annotations": [%s]}' % (file_name.encode(), anns))
    return list(READERS.get("coco")(root))


def test_other_readers_keep_paths_inside(tmp_path):
    with pytest.raises(DatasetError, match="captions_val2017.json: image path '../../../etc/passwd' leaves"):
        _coco(tmp_path / "coco", "../../../etc/passwd", [b"A dog ."])
    (tmp_path / "f8k").mkdir()
    (tmp_path / "f8k" / "Flickr8k.token.txt").write_text("../x.jpg#0\tA dog .\n")
    (tmp_path / "f8k" / "Flickr_8k.testImages.txt").write_text("../x.jpg\n")
    with pytest.raises(DatasetError, match=r"Flickr_8k.testImages.txt: image path '../x.jpg' leaves"):
        list(READERS.get("flickr8k")(tmp_path / "f8k"))
    (tmp_path / "f30k").mkdir()
    (tmp_path / "f30k" / "test.txt").write_text("../../etc/passwd\n")
    with pytest.raises(DatasetError, match=r"test.txt: image path '../../etc/passwd.txt' leaves"):
        list(READERS.get("flickr30k_entities")(tmp_path / "f30k"))


# ---------------------------------------------------------------- text that is not UTF-8

def test_coco_latin1_caption_is_rejected_the_rest_read(tmp_path):
    [spec] = _coco(tmp_path, "a.jpg", [b"A caf\xe9 with a dog .", b"A dog on a sofa ."])
    assert [check_caption(c, 60)[1] for c in spec["captions"]] == [BAD_UTF8, None]
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    row = empty_row(key=spec["key"], source=str(tmp_path / "a.jpg"), captions=json.dumps(spec["captions"]),
                    gold=json.dumps(spec["gold"]))
    row = INGEST.get("image_caption")().process([row])[0]
    assert row["reject"] == "" and [c["text"] for c in json.loads(row["captions"])] == ["A dog on a sofa ."]
    [bad] = json.loads(row["caption_rejects"])
    assert bad["reason"] == BAD_UTF8 and bad["text"] == "A caf? with a dog ."


def test_flickr30k_entities_latin1_sentence_is_rejected_the_rest_read(tmp_path):
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "test.txt").write_text("1\n")
    (tmp_path / "Sentences" / "1.txt").write_bytes(b"[/EN#1/people A gar\xe7on] smiles .\n"
                                                   b"[/EN#1/people A man] smiles .\n")
    (tmp_path / "Annotations" / "1.xml").write_text(
        "<annotation><object><name>1</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax>"
        "</bndbox></object></annotation>")
    [spec] = list(READERS.get("flickr30k_entities")(tmp_path))
    assert len(spec["captions"]) == 2 and spec["gold"]["links"]["1"] == [[0, 2, 0]]
    assert [check_caption(c, 60)[1] for c in spec["captions"]] == [BAD_UTF8, None]


def test_flickr30k_entities_malformed_box_names_the_file(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "1.xml").write_text("<annotation><object><name>1</name><bndbox><xmin>x</xmin>"
                                                    "</bndbox></object></annotation>")
    with pytest.raises(DatasetError, match=r"1.xml: malformed object"):
        f30k.parse_annotation(tmp_path / "Annotations" / "1.xml")
