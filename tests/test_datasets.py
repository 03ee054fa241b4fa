"""Dataset readers on the real files in ../shared/data, and on small fixtures written from the documented formats."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import COCO, FLICKR8K, FLICKR8K_FULL, needs_coco, needs_flickr8k, needs_flickr8k_full
from densevse.models import trees
from densevse.pipeline.config import DatasetConfig, SyntheticConfig
from densevse.pipeline.datasets import READERS, read_dataset
from densevse.pipeline.errors import DatasetError
from densevse.pipeline.datasets import flickr30k_entities as f30k
from densevse.pipeline.datasets import synthetic


@needs_flickr8k
def test_flickr8k_real_files():
    specs = list(READERS.get("flickr8k")(FLICKR8K))
    by_split = {s: sum(1 for x in specs if x["split"] == s) for s in ("train", "val", "test")}
    assert by_split == {"train": 753, "val": 113, "test": 125}  # the README's official split counts
    assert all(len(s["captions"]) == 5 and Path(s["source"]).is_file() for s in specs)
    first = next(s for s in specs if s["key"] == "flickr8k_1000268201_693b08cb0e")
    assert first["captions"][0].startswith("A child in a pink dress")
    assert len({s["key"] for s in specs}) == len(specs)


@needs_flickr8k
def test_flickr8k_split_filter_and_limit():
    cfg = DatasetConfig(kind="flickr8k", root=FLICKR8K, splits=["test"], limit=7)
    specs = list(read_dataset(cfg, FLICKR8K))
    assert len(specs) == 7 and {s["split"] for s in specs} == {"test"}


@needs_flickr8k_full
def test_flickr8k_whole_set_counts_and_quirks():
    """The whole official set: 8,091 photos with 5 captions each (40,455), the official 6,000 / 1,000 / 1,000
    split; the 3 space-separated lines parse; the 5 lines under `...jpg.1` are one recorded rejection."""
    from densevse.pipeline.datasets.flickr8k import parse_token_file

    caps = parse_token_file(FLICKR8K_FULL / "Flickr8k.token.txt")
    photos = {n: c for n, c in caps.items() if n.endswith(".jpg")}
    assert len(photos) == 8091 and sum(map(len, photos.values())) == 40455
    assert {len(c) for c in photos.values()} == {5}
    for name, n in (("1000268201_693b08cb0e.jpg", 0), ("1001773457_577c3a7d70.jpg", 0),
                    ("1002674143_1b742ab4b8.jpg", 1)):  # the space-separated lines, parsed into their own slot
        assert caps[name][n].startswith(("A child in a pink dress", "A black dog and a spotted dog",
                                         "A little girl is sitting"))
    specs = list(READERS.get("flickr8k")(FLICKR8K_FULL))
    by_split = {s: sum(1 for x in specs if x["split"] == s) for s in ("train", "val", "test", "unlisted")}
    assert by_split == {"train": 6000, "val": 1000, "test": 1000, "unlisted": 1}
    (bad,) = [s for s in specs if s.get("reject")]
    assert bad["split"] == "unlisted" and len(bad["captions"]) == 5
    assert "2258277193_586949ec62.jpg.1" in bad["reject"] and "names no image" in bad["reject"]
    assert all(Path(s["source"]).is_file() for s in specs if not s.get("reject"))
    # a reader's rejection is kept whatever dataset.splits says, and goes through the plan to the row
    cfg = DatasetConfig(kind="flickr8k", root=FLICKR8K_FULL, splits=["test"], limit=3)
    kept = list(read_dataset(cfg, FLICKR8K_FULL))
    assert [s["split"] for s in kept] == ["test"] * 3 + ["unlisted"]


def test_reader_rejections_reach_the_rows(tmp_path):
    from densevse.pipeline.preprocess.plan import read_shard, shard_rows, write_plan

    specs = [{"key": "a", "split": "train", "source": "/a.jpg", "captions": ["x"]},
             {"key": "b", "split": "train", "source": "", "captions": ["y"], "reject": "dataset: no image"}]
    infos = write_plan(iter(specs), 10, tmp_path / "plan")
    rows = shard_rows(read_shard(str(tmp_path / "plan" / infos[0]["file"]), infos[0]["row_group"]))
    assert [(r["key"], r["reject"]) for r in rows] == [("a", ""), ("b", "dataset: no image")]


def test_a_symlink_stored_as_a_text_file_is_followed(tmp_path):
    """flickr8k-1k's `images` is a file holding `../flickr8k/images` (a copy that lost the link)."""
    from densevse.pipeline.datasets.base import linked_dir

    (tmp_path / "full" / "images").mkdir(parents=True)
    (tmp_path / "slice").mkdir()
    (tmp_path / "slice" / "images").write_text("../full/images")
    assert linked_dir(tmp_path / "slice" / "images") == tmp_path / "full" / "images"
    (tmp_path / "slice" / "images").write_text("../../etc")
    with pytest.raises(DatasetError, match="outside the datasets folder"):
        linked_dir(tmp_path / "slice" / "images")
    assert linked_dir(tmp_path / "full" / "images") == tmp_path / "full" / "images"  # a real folder: itself


def test_flickr8k_malformed_token_file(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\na.jpg A cat without an id number\n")
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt:2"):
        list(READERS.get("flickr8k")(tmp_path))
    with pytest.raises(DatasetError, match="missing dataset file"):
        list(READERS.get("flickr8k")(tmp_path / "nowhere"))


@needs_coco
def test_coco_real_files_with_boxes():
    specs = list(READERS.get("coco")(COCO))
    assert {s["split"] for s in specs} == {"train", "val"} and len(specs) == 159
    assert all(len(s["captions"]) >= 5 and Path(s["source"]).is_file() for s in specs)
    with_boxes = [s for s in specs if s["gold"].get("boxes")]
    assert len(with_boxes) > 100
    s = with_boxes[0]
    b = np.array(s["gold"]["boxes"])
    assert b.shape[1] == 4 and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    assert len(s["gold"]["labels"]) == len(b) and all(isinstance(n, str) and n for n in s["gold"]["labels"])


def test_coco_malformed_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="captions_val2017.json: not valid JSON"):
        list(READERS.get("coco")(tmp_path))
    (tmp_path / "annotations" / "captions_val2017.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="needs 'images' and 'annotations'"):
        list(READERS.get("coco")(tmp_path))


@needs_flickr8k
def test_karpathy_format_built_from_real_flickr8k_captions(tmp_path):
    """A dataset_flickr8k.json in Karpathy's format, made from the real token file and split lists."""
    from densevse.pipeline.datasets.flickr8k import parse_token_file

    caps = parse_token_file(FLICKR8K / "Flickr8k.token.txt")
    names = (FLICKR8K / "Flickr_8k.testImages.txt").read_text().split()[:4]
    images = [{"filename": n, "split": ["train", "restval", "val", "test"][i],
               "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps[n]]} for i, n in enumerate(names)]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    specs = list(READERS.get("karpathy")(tmp_path))
    assert [s["split"] for s in specs] == ["train", "train", "val", "test"]  # restval folds into train
    assert specs[0]["captions"] == caps[names[0]] and specs[0]["key"] == "flickr8k_" + Path(names[0]).stem
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [{"filename": "x.jpg"}]}))
    with pytest.raises(DatasetError, match=r"images\[0\] lacks"):
        list(READERS.get("karpathy")(tmp_path))


F30K_SENT = ("[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing up "
             "[/EN#20/other a set of stairs] in [/EN#21/scene an entry way] .")
F30K_XML = """<annotation><filename>1000268201.jpg</filename>
<size><width>500</width><height>375</height><depth>3</depth></size>
<object><name>18</name><bndbox><xmin>150</xmin><ymin>30</ymin><xmax>290</xmax><ymax>360</ymax></bndbox></object>
<object><name>19</name><name>18</name><bndbox><xmin>160</xmin><ymin>120</ymin><xmax>280</xmax><ymax>300</ymax></bndbox></object>
<object><name>21</name><nobndbox>1</nobndbox><scene>1</scene></object>
</annotation>"""


def _f30k_fixture(root: Path, sentence: str = F30K_SENT, xml: str = F30K_XML) -> Path:
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "1000268201.txt").write_text(sentence + "\n")
    (root / "Annotations" / "1000268201.xml").write_text(xml)
    (root / "test.txt").write_text("1000268201\n")
    return root


def test_flickr30k_entities_fixture(tmp_path):
    text, phrases = f30k.parse_sentence(F30K_SENT)
    assert text == "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert phrases == [(0, 2, 18), (3, 6, 19), (9, 13, 20), (14, 17, 21)]
    [spec] = list(READERS.get("flickr30k_entities")(_f30k_fixture(tmp_path)))
    g = spec["gold"]
    assert spec["split"] == "test" and spec["captions"] == [text]
    assert g["boxes"] == [[150, 30, 290, 360], [160, 120, 280, 300]]
    # entity 18 ("A child") is in both boxes; 19 in the second; 21 has no box; 20 none at all
    assert sorted(map(tuple, g["links"]["0"])) == [(0, 2, 0), (0, 2, 1), (3, 6, 1)]


def test_flickr30k_entities_malformed(tmp_path):
    _f30k_fixture(tmp_path / "a", xml="<annotation><object>")
    with pytest.raises(DatasetError, match="1000268201.xml: malformed XML"):
        list(READERS.get("flickr30k_entities")(tmp_path / "a"))
    _f30k_fixture(tmp_path / "b", sentence="[/EN#18/people A child in a dress .")
    with pytest.raises(DatasetError, match=r"1000268201.txt:1: unbalanced"):
        list(READERS.get("flickr30k_entities")(tmp_path / "b"))


# ---------------------------------------------------------------- the embedded synthetic set

def test_synthetic_is_deterministic_and_seeded():
    img_a, ann_a = synthetic.make_image(seed=3, index=17)
    img_b, ann_b = synthetic.make_image(seed=3, index=17)
    _, ann_c = synthetic.make_image(seed=4, index=17)
    assert ann_a == ann_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert ann_a != ann_c


def test_synthetic_annotations_are_consistent():
    for i in range(40):
        img, ann = synthetic.make_image(seed=0, index=i)
        assert len(ann["captions"]) == 5 and len(set(ann["captions"])) >= 3
        assert img.size == (224, 224) and 2 <= len(ann["boxes"]) <= 4
        for k, (cap, ptb) in enumerate(zip(ann["captions"], ann["trees"])):
            t = trees.from_ptb(ptb)
            trees.validate(t)
            assert " ".join(t["tokens"]) == cap and trees.to_ptb(t) == ptb
            for start, end, box in ann["links"][str(k)]:
                colour, shape = ann["labels"][box].split()[1:]
                assert t["tokens"][end - 1] == shape and colour in t["tokens"][start:end]


def test_synthetic_pixels_match_boxes():
    """Each gold box holds its object's colour at the centre: the captions describe what is drawn."""
    for i in range(10):
        img, ann = synthetic.make_image(seed=0, index=i)
        a = np.asarray(img).astype(int)
        for box, label in zip(ann["boxes"], ann["labels"]):
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            want = np.array(synthetic.COLORS[label.split()[1]])
            assert np.abs(a[cy, cx] - want).max() < 60, (i, label)


def test_synthetic_captions_need_structure():
    """Bag of words is not enough: some caption pairs have the same words and opposite meanings."""
    seen: dict[tuple, set] = {}
    for i in range(300):
        _, ann = synthetic.make_image(seed=0, index=i)
        for cap in ann["captions"]:
            seen.setdefault(tuple(sorted(cap.split())), set()).add(cap)
    assert sum(len(v) > 1 for v in seen.values()) >= 20


def test_synthetic_generate_is_fast_idempotent_and_split(tmp_path):
    cfg = SyntheticConfig(num_images=400, test_images=100, val_fraction=0.1)
    ann = synthetic.generate(tmp_path, cfg)
    mtime = ann.stat().st_mtime_ns
    assert synthetic.generate(tmp_path, cfg).stat().st_mtime_ns == mtime  # finished set left alone
    recs = json.loads(ann.read_text())["images"]
    splits = [r["split"] for r in recs]
    assert splits.count("test") == 100 and splits.count("val") == 30 and splits.count("train") == 270
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 400
