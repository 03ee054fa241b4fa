"""Phrase grounding on real photos with silver links: COCO has captions and object boxes but no phrase-box links,
so a caption's noun phrase is linked to the photo's boxes of a category when its head noun names that category.

The link is "silver": it needs no annotator, but it is only as good as the head-noun rule and the synonym table.
A base noun phrase (an NP with no NP inside it) is linked when its head (its last noun: English NPs are
head-final) maps through SYNONYMS (plural "-s" / "-es" / "-men" forms folded) to a COCO category that has at
least one box in the photo. A phrase counts as grounded when its best-scoring candidate region has IoU >= 0.5
with ANY box of that category (several people in a photo are all "a man" candidates). The chance rate is the
same test for a uniformly random candidate region.

Pure functions on the project's tree format (models/trees.py), so they test on a hand-made fixture.
"""
from __future__ import annotations

import numpy as np

from densevse.models.metrics import box_iou

# head noun -> COCO category name (the 80 COCO categories as they appear in instances_*.json "name"). The nouns
# people use for a category in captions, from COCO / Flickr captions: not exhaustive, and documented in README.
SYNONYMS: dict[str, str] = {
    # person
    **{w: "person" for w in (
        "person", "man", "woman", "boy", "girl", "child", "kid", "people", "player", "guy", "lady", "baby",
        "toddler", "men", "women", "children", "kids", "adult", "teenager", "teen", "skier", "surfer",
        "skateboarder", "snowboarder", "rider", "biker", "cyclist", "gentleman", "crowd", "family", "couple",
        "athlete", "batter", "pitcher", "catcher", "umpire", "worker", "officer", "policeman", "soldier", "chef",
        "student", "tourist", "spectator", "someone", "youngster", "infant", "daughter", "son", "mother",
        "father", "dad", "mom", "friend", "dancer", "climber", "swimmer", "runner", "hiker", "fisherman")},
    # animals
    **{w: "dog" for w in ("dog", "puppy", "pup", "doggy", "hound", "terrier", "poodle", "labrador", "retriever",
                          "collie", "spaniel", "beagle", "bulldog", "shepherd", "dachshund", "greyhound")},
    **{w: "cat" for w in ("cat", "kitten", "kitty")},
    **{w: "horse" for w in ("horse", "pony", "foal", "stallion", "mare")},
    **{w: "sheep" for w in ("sheep", "lamb", "ram")},
    **{w: "cow" for w in ("cow", "cattle", "calf", "bull", "ox")},
    **{w: "bird" for w in ("bird", "pigeon", "seagull", "gull", "duck", "goose", "parrot", "eagle", "crow",
                           "swan", "chicken")},
    "elephant": "elephant", "bear": "bear", "zebra": "zebra", "giraffe": "giraffe",
    # vehicles
    **{w: "car" for w in ("car", "taxi", "cab", "suv", "sedan", "jeep", "vehicle")},
    **{w: "bicycle" for w in ("bicycle", "bike", "cycle")},
    **{w: "motorcycle" for w in ("motorcycle", "motorbike", "scooter", "moped")},
    **{w: "airplane" for w in ("airplane", "plane", "jet", "aircraft", "airliner")},
    **{w: "bus" for w in ("bus",)},
    **{w: "train" for w in ("train", "locomotive", "tram")},
    **{w: "truck" for w in ("truck", "lorry", "pickup")},
    **{w: "boat" for w in ("boat", "ship", "canoe", "kayak", "sailboat", "yacht", "raft")},
    # outdoor and sports
    "bench": "bench", "umbrella": "umbrella", "frisbee": "frisbee", "kite": "kite",
    **{w: "sports ball" for w in ("ball", "football", "soccerball", "baseball", "basketball", "volleyball")},
    **{w: "skis" for w in ("ski", "skis")},
    "snowboard": "snowboard", "skateboard": "skateboard", "surfboard": "surfboard",
    **{w: "tennis racket" for w in ("racket", "racquet")},
    **{w: "baseball bat" for w in ("bat",)},
    **{w: "baseball glove" for w in ("glove", "mitt")},
    **{w: "traffic light" for w in ("stoplight",)},
    **{w: "fire hydrant" for w in ("hydrant",)},
    # indoor
    "chair": "chair", "couch": "couch", "sofa": "couch", "bed": "bed", "toilet": "toilet",
    **{w: "dining table" for w in ("table", "desk")},
    **{w: "tv" for w in ("tv", "television")},
    **{w: "laptop" for w in ("laptop", "computer")},
    **{w: "cell phone" for w in ("phone", "cellphone", "smartphone")},
    "book": "book", "clock": "clock", "vase": "vase", "bottle": "bottle", "cup": "cup", "bowl": "bowl",
    "pizza": "pizza", "sandwich": "sandwich", "cake": "cake", "donut": "donut", "doughnut": "donut",
    "banana": "banana", "apple": "apple", "orange": "orange", "broccoli": "broccoli", "carrot": "carrot",
    "backpack": "backpack", "handbag": "handbag", "purse": "handbag", "suitcase": "suitcase", "luggage": "suitcase",
    "tie": "tie", "keyboard": "keyboard", "refrigerator": "refrigerator", "fridge": "refrigerator",
    "oven": "oven", "sink": "sink", "microwave": "microwave", "teddy": "teddy bear",
}
_IRREGULAR = {"men": "men", "women": "women", "children": "children", "people": "people", "mice": "mouse",
              "geese": "goose", "feet": "foot", "sheep": "sheep", "skis": "skis"}


def normalise(word: str) -> str:
    """A caption word as a SYNONYMS key: lower case, a plural folded to its singular when the singular is known."""
    w = word.lower().strip(".,;:!?\"'")
    if w in SYNONYMS or w in _IRREGULAR:
        return _IRREGULAR.get(w, w)
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if w.endswith(suffix) and (w[: -len(suffix)] + repl) in SYNONYMS:
            return w[: -len(suffix)] + repl
    return w


def category_of(word: str) -> str | None:
    return SYNONYMS.get(normalise(word))


def base_noun_phrases(tree: dict) -> list[int]:
    """The NP nodes with no NP node inside them (base NPs), in token order."""
    n, labels, parents = len(tree["tokens"]), tree["labels"], tree["parents"]
    has_np_child = {parents[i] for i in range(n, len(labels)) if labels[i] == "NP" and parents[i] >= 0}
    return sorted((i for i in range(n, len(labels)) if labels[i] == "NP" and i not in has_np_child),
                  key=lambda i: tree["spans"][i][0])


def head_noun(tree: dict, node: int) -> int | None:
    """The token index of a phrase's head noun: its last token tagged NN* (the tree's word labels are POS
    tags), else its last token; None for an empty span."""
    s, e = tree["spans"][node]
    nouns = [t for t in range(s, e) if tree["labels"][t].startswith("NN")]
    return nouns[-1] if nouns else (e - 1 if e > s else None)


def link(tree: dict, gold_labels: list[str]) -> list[dict]:
    """Silver links of one caption: [{"node", "start", "end", "text", "category", "boxes": [gold box indices]}]
    for every base NP whose head noun maps to a category the photo has boxes of."""
    by_cat: dict[str, list[int]] = {}
    for b, name in enumerate(gold_labels):
        by_cat.setdefault(str(name), []).append(b)
    out = []
    for node in base_noun_phrases(tree):
        h = head_noun(tree, node)
        cat = category_of(tree["tokens"][h]) if h is not None else None
        if cat and cat in by_cat:
            s, e = tree["spans"][node]
            out.append({"node": node, "start": s, "end": e, "text": " ".join(tree["tokens"][s:e]), "category": cat,
                        "boxes": by_cat[cat]})
    return out


def grounded(scores: np.ndarray, candidates: np.ndarray, gold: np.ndarray, thr: float = 0.5) -> tuple[bool, float]:
    """(is the best-scoring candidate region within IoU thr of any gold box, the same rate for a random
    candidate): scores (R,) over candidates (R, 4), gold (G, 4) the boxes of the linked category."""
    if len(candidates) == 0 or len(gold) == 0:
        raise ValueError("grounding needs candidate regions and gold boxes")
    hit = box_iou(candidates, gold).max(1) >= thr
    return bool(hit[int(np.argmax(scores))]), float(hit.mean())


def summarize(results: list[tuple[bool, float]], n_phrases: int) -> dict:
    """Accuracy and chance (in %) over linked phrases, and how many of all noun phrases could be linked."""
    n = len(results)
    return {"silver_grounding_acc": 100.0 * float(np.mean([h for h, _ in results])) if n else float("nan"),
            "silver_grounding_chance": 100.0 * float(np.mean([c for _, c in results])) if n else float("nan"),
            "silver_linked_phrases": n, "silver_noun_phrases": n_phrases}


def silver_sample(sample: dict, captions: list[dict]) -> tuple[dict, int]:
    """A sample whose gold has box labels but no phrase links (COCO), with silver links in its meta's gold
    ("links": caption index -> [[node, box index], ...], every box of the linked category), as the batch
    builder (models/batch.py) reads gold links; and how many base noun phrases its captions hold. Other
    samples come back as they are (0 noun phrases counted): their own gold links are the exact ones."""
    gold = sample["meta"].get("gold") or {}
    if not gold.get("labels") or gold.get("links"):
        return sample, 0
    links, n_np = {}, 0
    for c in captions:
        n_np += len(base_noun_phrases(c["tree"]))
        found = [[ln["node"], b] for ln in link(c["tree"], gold["labels"]) for b in ln["boxes"]]
        if found:
            links[str(c["index"])] = found
    meta = {**sample["meta"], "gold": {**gold, "links": links, "silver": True}}
    return {**sample, "meta": meta}, n_np
