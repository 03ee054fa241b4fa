"""Models, losses, metrics and the shard loader, without Ray."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from densevse.models import MODELS, new_embedding_model
from densevse.models.hmlstm import ChildSumTreeLSTM
from densevse.models.losses import embedding_loss, hinge_ranking
from densevse.models import trees
from densevse.pipeline.config import TrainConfig
from densevse.models.metrics import box_iou, grounding_accuracy, ranks, recall_at_k
from densevse.pipeline.shardset import eval_items, iter_samples, rank_shards, shard_paths
from densevse.pipeline.training.data import batched_pairs, build_vocabs, iter_pairs
from densevse.models.batch import collate
from shard_fixture import random_tree, write_fixture_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_fixture_shards(tmp_path_factory.mktemp("shards"), n_train=30, n_val=10, n_test=10, per_shard=7)


@pytest.fixture(scope="module")
def batch(shards):
    vocab, labels = build_vocabs(shard_paths(shards, "train"))
    items = next(eval_items(shard_paths(shards, "val"), 5, 6))
    return collate(items, vocab, labels), vocab, labels


def _flat(tree_list):
    parent, height, off = [], [], 0
    for t in tree_list:
        parent += [p + off if p >= 0 else -1 for p in t["parents"]]
        height += trees.heights(t)
        off += len(t["parents"])
    return torch.tensor(parent), torch.tensor(height)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_level_batched_tree_lstm_equals_recursive_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tl = [random_tree(rng, rng.randint(1, 12)) for _ in range(7)]
    for t in tl:
        trees.validate(t)
    parent, height = _flat(tl)
    cell = ChildSumTreeLSTM(6, 5).double()
    x = torch.randn(len(parent), 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(len(parent), 5, dtype=torch.double)

    def run(fn):
        cell.zero_grad()
        x.grad = None
        h, c = fn(x, parent, height)
        ((h * w).sum() + (c * w).sum() ** 2).backward()
        return h.detach(), c.detach(), x.grad.clone(), [p.grad.clone() for p in cell.parameters()]

    hb, cb, gxb, gpb = run(cell.forward)
    hn, cn, gxn, gpn = run(cell.forward_naive)
    torch.testing.assert_close(hb, hn)
    torch.testing.assert_close(cb, cn)
    torch.testing.assert_close(gxb, gxn)
    for a, b in zip(gpb, gpn):
        torch.testing.assert_close(a, b)
    assert gxb.abs().sum() > 0


def test_hmlstm_batched_equals_naive_on_real_batch(batch):
    b, vocab, labels = batch
    torch.manual_seed(0)
    m = new_embedding_model("hmlstm", TrainConfig(hidden_dim=16, embed_dim=8), vocab_size=len(vocab),
                            n_labels=len(labels), feat_dim=b.feats.shape[2]).double()
    b.feats = b.feats.double()
    outs = []
    for naive in (False, True):
        m.naive = naive
        m.zero_grad()
        img, txt = m(b)
        (m.scores(img, txt).sum() + txt["phrases"].sum()).backward()
        outs.append((txt["sentence"].detach(), img["regions"].detach(), m.words.weight.grad.clone(),
                     m.image_tree.W.weight.grad.clone()))
    b.feats = b.feats.float()
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c)


def test_recall_hand_computed():
    # 3 images, captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    s = np.array([[0.9, 0.2, 0.95, 0.1, 0.0],    # image 0: caption 2 (wrong) first, then caption 0 -> rank 2
                  [0.5, 0.4, 0.3, 0.8, 0.1],     # image 1: caption 3 first -> rank 1
                  [0.6, 0.7, 0.1, 0.2, 0.3]])    # image 2: caption 4 is 3rd -> rank 3
    ci = np.array([0, 0, 1, 1, 2])
    i2t, t2i = ranks(s, ci)
    assert i2t.tolist() == [2, 1, 3]
    # caption 0: image 0 best (0.9) -> 1; caption 1: image 2 (0.7), 1 (0.4), 0 (0.2) -> 3;
    # caption 2: image 0 (0.95) first -> 2; caption 3: image 1 -> 1; caption 4: image 2 (0.3) first -> 1
    assert t2i.tolist() == [1, 3, 2, 1, 1]
    r = recall_at_k(s, ci, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["t2i_r1"] == 60.0 and r["t2i_r2"] == 80.0
    assert r["i2t_medr"] == 2 and r["t2i_medr"] == 1 and r["t2i_meanr"] == pytest.approx(1.6)
    assert r["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 60 + 80)


def test_iou_and_grounding():
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0] == pytest.approx(50 / 150)
    assert grounding_accuracy([[0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 10, 9], [20, 20, 30, 30]]) == 50.0


def test_hinge_ranking_hand_computed():
    s = torch.tensor([[0.5, 0.4], [0.1, 0.6]])
    pos = torch.eye(2, dtype=torch.bool)
    # pair (0,0): row neg 0.4 -> 0.2-0.5+0.4=0.1; col neg 0.1 -> 0. pair (1,1): row 0.1 -> 0; col 0.4 -> 0.
    assert hinge_ranking(s, pos, 0.2).item() == pytest.approx(0.05)
    assert hinge_ranking(s, pos, 0.2, hardest=True).item() == pytest.approx(0.05)
    s2 = torch.tensor([[0.5, 0.45, 0.4]])
    assert hinge_ranking(s2, torch.tensor([[True, False, False]]), 0.2).item() == pytest.approx(0.15 + 0.1)
    assert hinge_ranking(s2, torch.tensor([[True, False, False]]), 0.2, hardest=True).item() == pytest.approx(0.15)


@pytest.mark.parametrize("name", ["hmlstm", "vse", "dvsa"])
def test_models_train_step(name, batch):
    b, vocab, labels = batch
    torch.manual_seed(0)
    m = new_embedding_model(name, TrainConfig(hidden_dim=16, embed_dim=8), vocab_size=len(vocab),
                            n_labels=len(labels), feat_dim=b.feats.shape[2])
    img, txt = m(b)
    B, T, P = len(b.keys), len(b.caption_image), len(b.phrase_node)
    assert m.scores(img, txt).shape == (B, T)
    assert m.phrase_scores(img, txt).shape == (P, B, b.feats.shape[1])
    loss, parts = embedding_loss(m, img, txt, b, 0.2, False, 1.0)
    assert ("loss_phrase" in parts) == (name == "hmlstm")
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert name in MODELS
    s, best = m.scores_and_phrase_best(img, txt)  # the loss's one call: the same scores, phrases computed once
    assert torch.equal(s, m.scores(img, txt))
    if name == "hmlstm":
        assert torch.equal(best, m.phrase_scores(img, txt).amax(-1))
        pos = b.caption_image[b.phrase_caption][:, None] == torch.arange(B)[None]
        expected = (hinge_ranking(s, b.caption_image[None] == torch.arange(B)[:, None], 0.2)
                    + hinge_ranking(m.phrase_scores(img, txt).amax(-1), pos, 0.2))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    else:
        assert best is None


def test_dvsa_score_is_mean_over_words_of_best_region(batch):
    b, vocab, labels = batch
    m = new_embedding_model("dvsa", TrainConfig(hidden_dim=16, embed_dim=8), vocab_size=len(vocab),
                            n_labels=len(labels), feat_dim=b.feats.shape[2])
    with torch.no_grad():
        img, txt = m(b)
        s = m.scores(img, txt)
        i, t = 1, 3
        n, L = int(b.valid[i].sum()), int(b.lengths[t])
        ref = (txt["words"][t, :L] @ img["regions"][i, :n].T).amax(1).mean()
    assert s[i, t].item() == pytest.approx(ref.item(), abs=1e-6)


def test_glove_init_and_collate(batch):
    from densevse.models.vocab import glove_init

    b, vocab, labels = batch
    emb, found = glove_init(vocab)
    assert found >= len(vocab) - 3 and emb.shape == (len(vocab), 50)
    red = emb[vocab("red")]
    assert np.abs(red).sum() > 1 and not np.allclose(red, emb[vocab("blue")])
    # word_node points at word nodes holding the token ids; phrase spans match their token ids
    ok = b.word_node >= 0
    assert torch.equal(b.node_word[b.word_node[ok]], b.tokens[ok])
    assert b.gold and all(0 <= p < len(b.phrase_node) for p, _ in b.gold)


@pytest.mark.parametrize("world", [2, 7])  # 5 train shards: whole shards per rank / samples split within shards
def test_rank_shards_disjoint_and_complete(shards, world):
    paths = shard_paths(shards, "train")
    assert len(paths) == 5
    every = sorted((s["key"], c["index"]) for s in iter_samples(paths) for c in s["meta"]["captions"])
    seen = []
    for rank in range(world):
        mine = [(s["key"], c["index"]) for items in batched_pairs(iter_pairs(rank_shards(paths, rank, world), 0, 0, 40), 8)
                for s, caps in items for c in caps]
        assert len(set(mine)) == len(mine) and mine  # no pair twice, no rank without data
        seen.append(set(mine))
    assert sum(len(x) for x in seen) == len(every)  # disjoint
    assert sorted(set().union(*seen)) == every       # complete


def test_train_refuses_shards_without_pairs(tmp_path):
    """A train split with no captions fails up front, instead of "training" epochs of 0 pairs and loss 0."""
    from densevse.pipeline import shardset as S
    from densevse.pipeline.config import parse_config
    from densevse.pipeline.training.tasks import train
    from shard_fixture import COLORS, SHAPES, make_row

    row = make_row(0, "train", "train-000000", 8, 32, 0, {w: np.zeros(8) for w in (*COLORS, *SHAPES)})
    row["captions"] = "[]"
    S.write_shard([row], tmp_path, "train-000000")
    S.write_manifest(tmp_path, ["train-000000"])  # readers take the manifest's shards only
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "run")}, "shards": {"dir": str(tmp_path)}})
    with pytest.raises(ValueError, match="0 captions"):
        train(cfg)


def test_branching_trees_keep_the_words_and_read_them_in_order():
    t = trees.from_ptb("(S (NP (DT a) (NN dog)) (VP (VBZ runs) (PP (IN on) (NP (NN grass)))))")
    left, right = trees.restructure(t, "left_branching"), trees.restructure(t, "right_branching")
    for r in (left, right):
        trees.validate(r)
        assert r["tokens"] == t["tokens"] and r["labels"][:5] == t["labels"][:5]  # the words and their POS tags
    assert trees.to_ptb(left) == "(XP (XP (XP (XP (DT a) (NN dog)) (VBZ runs)) (IN on)) (NN grass))"
    assert trees.to_ptb(right) == "(XP (DT a) (XP (NN dog) (XP (VBZ runs) (XP (IN on) (NN grass)))))"
    assert trees.restructure(t, "parse") is t
    assert trees.to_ptb(trees.restructure(trees.from_ptb("(NP (NN dog))"), "left_branching")) == "(XP (NN dog))"
    with pytest.raises(trees.TreeError, match="unknown text tree"):
        trees.restructure(t, "balanced")


def test_hmlstm_text_tree_is_a_checkpointed_setting_that_changes_batches(shards):
    from densevse.models import rebuild

    vocab, labels = build_vocabs(shard_paths(shards, "train"))
    items = next(eval_items(shard_paths(shards, "val"), 5, 6))
    parse, left = collate(items, vocab, labels), collate(items, vocab, labels, "left_branching")
    assert torch.equal(parse.tokens, left.tokens) and not torch.equal(parse.parent, left.parent)
    n_words = int(left.lengths.sum())
    assert len(left.parent) == 2 * n_words - int((left.lengths > 1).sum())  # n words + n-1 inner nodes each
    assert not left.gold  # gold links name parse nodes
    m = new_embedding_model("hmlstm", TrainConfig(hidden_dim=16, embed_dim=8, text_tree="left_branching"),
                            vocab_size=len(vocab), n_labels=len(labels), feat_dim=left.feats.shape[2])
    assert m.caption_tree == "left_branching"
    assert rebuild("hmlstm", m.hparams).caption_tree == "left_branching"  # evaluation and serving rebuild it
    img, txt = m(left)
    assert txt["sentence"].shape[0] == len(left.caption_image) and torch.isfinite(txt["phrases"]).all()


def test_hmlstm_phrase_score_switch_and_hardest_negative_warmup(batch):
    from densevse.pipeline.training.embedding import hardest_negatives_at

    batch, vocab, labels = batch
    dims = dict(vocab_size=len(vocab), n_labels=len(labels), feat_dim=batch.feats.shape[2])
    torch.manual_seed(0)
    on = new_embedding_model("hmlstm", TrainConfig(hidden_dim=16, embed_dim=8), **dims)
    off = new_embedding_model("hmlstm", TrainConfig(hidden_dim=16, embed_dim=8, phrase_score=False), **dims)
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        img, txt = off(batch)
        glob = img["image"] @ txt["sentence"].T
        assert torch.allclose(off.scores(img, txt), glob)  # the global match only
        assert not torch.allclose(on.scores(img, txt), glob)  # + the phrases' best region match
    assert off.hparams["phrase_score"] is False
    flat = new_embedding_model("hmlstm", TrainConfig(hidden_dim=16, embed_dim=8, region_tree=False), **dims)
    img, _ = flat(batch)
    assert flat.image_tree is None and img["regions"].shape[:2] == batch.feats.shape[:2]
    with torch.no_grad():  # each row alone: the image row does not depend on its regions
        one = batch.feats.clone()
        one[:, 1:] += 1.0
        moved = flat.encode_images(dataclasses.replace(batch, feats=one))
    assert torch.allclose(moved["image"], img["image"].detach(), atol=1e-6)
    tc = TrainConfig(hardest_negative=True, hardest_negative_warmup=2)
    assert [hardest_negatives_at(tc, e) for e in range(4)] == [False, False, True, True]
    assert not any(hardest_negatives_at(TrainConfig(hardest_negative_warmup=2), e) for e in range(4))
