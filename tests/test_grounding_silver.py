"""Silver phrase grounding (models/grounding.py) and the COCO 1K / 5K retrieval protocols (models/metrics.py), on
small hand-made fixtures whose answers are worked out by hand."""
import numpy as np
import pytest

from densevse.models import grounding as G
from densevse.models import trees
from densevse.models.metrics import recall_at_k, recall_folds

# "two men ride horses near a dog ." : base NPs "two men", "horses", "a dog"
TREE = trees.from_ptb("(S (NP (CD two) (NNS men)) (VP (VBP ride) (NP (NP (NNS horses)) (PP (IN near) "
                      "(NP (DT a) (NN dog))))) (. .))")


def test_head_nouns_synonyms_and_plurals():
    assert [G.normalise(w) for w in ("Men", "horses", "puppies", "Dog.", "buses", "children")] == \
        ["men", "horse", "puppy", "dog", "bus", "children"]
    assert [G.category_of(w) for w in ("woman", "puppies", "kids", "sofa", "table", "sky")] == \
        ["person", "dog", "person", "couch", "dining table", None]
    nps = G.base_noun_phrases(TREE)
    assert [" ".join(TREE["tokens"][slice(*TREE["spans"][i])]) for i in nps] == ["two men", "horses", "a dog"]
    assert [TREE["tokens"][G.head_noun(TREE, i)] for i in nps] == ["men", "horses", "dog"]


def test_link_only_categories_the_photo_has():
    links = G.link(TREE, ["person", "horse", "person", "car"])  # no dog box in the photo
    assert [(x["text"], x["category"], x["boxes"]) for x in links] == [("two men", "person", [0, 2]),
                                                                      ("horses", "horse", [1])]
    assert G.link(TREE, ["car"]) == []


def test_grounded_takes_any_box_of_the_category_and_gives_chance():
    candidates = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 100, 100]], float)
    gold = np.array([[51, 51, 60, 60], [200, 200, 210, 210]], float)  # two boxes of the category
    assert G.grounded(np.array([0.1, 0.9, 0.3]), candidates, gold) == (True, pytest.approx(1 / 3))
    assert G.grounded(np.array([0.9, 0.1, 0.3]), candidates, gold) == (False, pytest.approx(1 / 3))
    s = G.summarize([(True, 0.25), (False, 0.25), (True, 0.5)], n_phrases=10)
    assert s == {"silver_grounding_acc": pytest.approx(200 / 3), "silver_grounding_chance": pytest.approx(100 / 3),
                 "silver_linked_phrases": 3, "silver_noun_phrases": 10}
    with pytest.raises(ValueError):
        G.grounded(np.array([]), np.zeros((0, 4)), gold)


def test_1k_folds_average_and_5k_is_all_images():
    rng = np.random.default_rng(0)
    n_img, per = 2000, 5
    cap_img = np.repeat(np.arange(n_img), per)
    scores = rng.normal(size=(n_img, n_img * per))
    scores[cap_img, np.arange(n_img * per)] += 3.0  # each caption's own image scores higher
    folds = recall_folds(scores, cap_img, fold_images=1000)
    by_hand = [recall_at_k(scores[lo:lo + 1000][:, lo * per:(lo + 1000) * per], cap_img[lo * per:(lo + 1000) * per]
                           - lo) for lo in (0, 1000)]
    assert folds["folds"] == 2
    assert folds["i2t_r1"] == pytest.approx(np.mean([r["i2t_r1"] for r in by_hand]))
    assert folds["t2i_r5"] == pytest.approx(np.mean([r["t2i_r5"] for r in by_hand]))
    every = recall_folds(scores, cap_img, fold_images=n_img)  # the 5K protocol: one fold of every image
    assert every["i2t_r1"] == pytest.approx(recall_at_k(scores, cap_img)["i2t_r1"])
    assert every["t2i_r1"] < folds["t2i_r1"]  # more images to confuse with: lower recall
    with pytest.raises(ValueError, match="do not split"):
        recall_folds(scores[:1500], cap_img[:7500], fold_images=1000)


def _coco_sample(labels, boxes):
    """A COCO-like shard sample: boxes with category labels and no links; regions = the whole image + the boxes."""
    caps = [{"index": 0, "tree": TREE}, {"index": 1, "tree": trees.from_ptb("(S (NP (DT a) (NN cat)) (VP (VBZ sits)))")}]
    regions = np.asarray([[0, 0, 100, 100]] + boxes, np.float32)
    return {"key": "k", "feats": np.eye(len(regions), 4, dtype=np.float32), "boxes": regions,
            "meta": {"captions": caps, "gold": {"boxes": boxes, "labels": labels}}}, caps


def test_silver_sample_links_every_box_of_the_category_and_counts_noun_phrases():
    s, caps = _coco_sample(["person", "horse", "person"], [[0, 0, 10, 10], [20, 20, 40, 40], [60, 60, 90, 90]])
    linked, n_np = G.silver_sample(s, caps)
    assert n_np == 4  # "two men", "horses", "a dog"; "a cat"
    men, horses, _dog = G.base_noun_phrases(TREE)
    assert linked["meta"]["gold"]["links"] == {"0": [[men, 0], [men, 2], [horses, 1]]}  # no cat box: no "1"
    assert linked["meta"]["gold"]["silver"] and "links" not in s["meta"]["gold"]  # the input is not changed
    exact = {**s, "meta": {**s["meta"], "gold": {**s["meta"]["gold"], "links": {"0": [[5, 0]]}}}}
    assert G.silver_sample(exact, caps) == (exact, 0)  # exact links win: nothing silver about them


def test_silver_grounding_scores_the_best_candidate_against_any_box_of_the_category():
    """Through the batch builder: "two men" (boxes 0 and 2) and "horses" (box 1). Scores put "two men" on
    region 3 (box 2: a hit, though box 0 is the first person box) and "horses" on region 3 too (a miss)."""
    import torch

    from densevse.models.batch import collate
    from densevse.models.vocab import Vocab
    from densevse.pipeline.evaluation.retrieval import _silver_grounded

    boxes = [[0, 0, 10, 10], [20, 20, 40, 40], [60, 60, 90, 90]]
    s, caps = _coco_sample(["person", "horse", "person"], boxes)
    linked, _ = G.silver_sample(s, caps)
    b = collate([(linked, caps)], Vocab(["<pad>", "<unk>"]), Vocab(["<pad>", "<unk>"]))
    ps = torch.zeros(len(b.phrase_text), 1, 4)
    ps[:, 0, 3] = 1.0  # every phrase's best region: row 3 = box 2 (rows: whole image, boxes 0, 1, 2)
    out = dict(zip((b.phrase_text[p] for p, _ in dict.fromkeys((p, 0) for p, _ in b.gold)),
                   _silver_grounded(ps, b)))
    assert out == {"two men": (True, pytest.approx(2 / 3)), "horses": (False, pytest.approx(1 / 3))}
    assert G.summarize(list(out.values()), 4) == {"silver_grounding_acc": 50.0,
                                                   "silver_grounding_chance": pytest.approx(50.0),
                                                   "silver_linked_phrases": 2, "silver_noun_phrases": 4}


def test_whole_image_regions_ignore_the_datasets_boxes():
    import io
    import json

    from densevse.stages.base import REGIONS

    row = {"width": 64, "height": 48, "gold": json.dumps({"boxes": [[1, 2, 3, 4]], "labels": ["dog"]})}
    for impl, want in (("whole_image", [[0, 0, 64, 48]]), ("gold_boxes", [[0, 0, 64, 48], [1, 2, 3, 4]])):
        r = dict(row)
        REGIONS.get(impl)().process_row(r)
        assert np.load(io.BytesIO(r["boxes"])).tolist() == want, impl
