"""The vocabularies come from the training captions only (issue 28 part 8): a word or tree label that appears
only in val or test captions is <unk> to every trained model, embedding models and the captioner alike.

Shards of fixture scenes, each val and test sample with one extra caption of its own split's words; each
training task is started through the loop's entry point (`fit`, which picks the shards), and stopped where the
driver hands over to Ray, after it has built the vocabularies."""
from __future__ import annotations

import json

import numpy as np
import pytest

from densevse.models import trees
from densevse.models.vocab import PAD, UNK, Vocab, normalize
from densevse.pipeline import shardset
from densevse.pipeline.config import parse_config
from tests.shard_fixture import COLORS, SHAPES, make_row

# Per split, a caption whose words (and, in test, tree labels) no other split has. Capitals: the vocabulary
# holds normalised words, so a leak would show as the lower-case form.
ONLY = {"train": "(S (NP (DT a) (JJ Burgundy) (NN kite)) (VP (VBZ drifts)))",
        "val": "(S (NP (DT a) (JJ Quokka) (NN circle)) (VP (VBZ naps)))",
        "test": "(FRAG (UH Wow) (NP (DT some) (JJ zebra) (NN square)) (VP (VBZ hums)))"}


class Handover(Exception):
    """Raised where fit would start Ray: the vocabularies are built by then."""


def _shards(shard_dir):
    """2 train, 1 val, 1 test shard of 4 samples; returns {split: rows written}."""
    rng = np.random.default_rng(1)
    codes = {w: rng.normal(size=32) for w in (*COLORS, *SHAPES)}
    rows, names, index = {}, [], 0
    for split, n_shards in (("train", 2), ("val", 1), ("test", 1)):
        for si in range(n_shards):
            name = shardset.shard_name(split, si)
            part = [make_row(index + i, split, name, 32, 64, 0, codes) for i in range(4)]
            index += len(part)
            for r in part:
                caps, gold = json.loads(r["captions"]), json.loads(r["gold"])
                tree = trees.from_ptb(ONLY[split])
                caps.append({"index": len(caps), "text": " ".join(tree["tokens"]), "tree": tree,
                             "phrases": trees.phrases(tree)})
                obj = next(i for i, lab in enumerate(tree["labels"]) if lab == "NP")  # linked to a gold box, so
                gold["links"][str(len(caps) - 1)] = [[obj, 0]]  # the captioner would take it as a phrase pair
                r.update(captions=json.dumps(caps), gold=json.dumps(gold))
            shardset.write_shard(part, shard_dir, name)
            rows.setdefault(split, []).extend(part)
            names.append(name)
    shardset.write_manifest(shard_dir, names)
    return rows


def _words_labels(rows):
    words, labels = set(), set()
    for r in rows:
        for c in json.loads(r["captions"]):
            words.update(normalize(t) for t in c["tree"]["tokens"])
            labels.update(c["tree"]["labels"])
    return words, labels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab")
    rows = _shards(tmp / "shards")
    cfg = parse_config({"run": {"output_dir": str(tmp / "run")}, "shards": {"dir": str(tmp / "shards")},
                        "train": {"word_vectors": "random"}})
    train_words, train_labels = _words_labels(rows["train"])
    held_words, held_labels = (set().union(*x) for x in zip(_words_labels(rows["val"]), _words_labels(rows["test"])))
    leaks = held_words - train_words
    # the fixture has what the test needs: words and labels of val/test only, and a train-only word
    assert {"quokka", "naps", "wow", "zebra", "hums"} <= leaks and {"FRAG", "UH"} <= held_labels - train_labels
    assert "burgundy" in train_words - held_words
    return cfg, train_words, train_labels, leaks, held_labels - train_labels


def _prepared(cfg, name, monkeypatch):
    """The task `name` after the loop's driver prepared it on the shards it chose, as `densevse train` runs it."""
    from densevse.pipeline.training import loop
    from densevse.pipeline.training.tasks import TASKS

    def handover(cfg):
        raise Handover

    monkeypatch.setattr(loop, "init_ray", handover)
    task = TASKS.get(name)(cfg)
    with pytest.raises(Handover):
        loop.fit(cfg, task)
    return task


def test_embedding_vocabularies_hold_training_words_and_labels_only(setup, monkeypatch):
    cfg, train_words, train_labels, leaks, label_leaks = setup
    task = _prepared(cfg, cfg.train.model, monkeypatch)
    assert task.words == [PAD, UNK, *sorted(train_words)]  # every training word, and nothing else
    assert task.label_words == [PAD, UNK, *sorted(train_labels)]
    vocab, labels = Vocab(task.words), Vocab(task.label_words)
    assert {w: vocab(w) for w in leaks} == {w: 1 for w in leaks}  # val/test-only words: <unk>
    assert {lab: labels(lab) for lab in label_leaks} == {lab: 1 for lab in label_leaks}
    assert vocab("burgundy") > 1


def test_captioner_vocabulary_holds_training_words_only(setup, monkeypatch):
    from densevse.models.mrnn import SPECIALS

    cfg, train_words, _, leaks, _ = setup
    task = _prepared(cfg, "captioner", monkeypatch)
    # min_word_count 1 and captions under max_len: every training word is kept
    assert task.words == [*SPECIALS, *sorted(train_words)]
    vocab = Vocab(task.words)
    assert {w: vocab(w) for w in leaks} == {w: 1 for w in leaks}
