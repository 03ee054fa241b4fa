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
