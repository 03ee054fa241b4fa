"""Description generation: the m-RNN decoder, its training pairs, the dense description, `densevse describe`,
and (slow) Ray Train + MLflow + pycocoevalcap end to end on tiny fixture shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from densevse.models.mrnn import MRNN, PHRASE, SENTENCE
from densevse.models.captioner import Captioner
from densevse.pipeline.training.captioner import Pairs, build_vocab, region_phrases, run_epoch
from densevse.models.metrics import nearest_captions, object_precision, object_recall
from densevse.pipeline.cli.main import main
from densevse.pipeline.config import load_config
from densevse.pipeline.serving.describe import Describer
from densevse.models.captioner import dedup_boxes, dense_description
from densevse.pipeline.shardset import iter_samples, shard_paths
from tests.shard_fixture import write_fixture_shards

EFFNET_DIM = 1280  # the features stage's output: the CLI test featurises a real image


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.output_dir={tmp_path}", "stages.regions.impl=gold_boxes", "stages.regions.params={}",
                              "stages.parse.impl=gold_trees", "stages.parse.params={}", "train.word_vectors=random",
                              "captioner.hidden_dim=64", "captioner.beam_size=3", *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A captioner trained in-process (no Ray) on fixture shards with 1280-d features: (checkpoint, shard dir)."""
    tmp = tmp_path_factory.mktemp("describe")
    shard_dir = write_fixture_shards(tmp / "shards", n_train=40, n_val=10, n_test=10, feat_dim=EFFNET_DIM)
    train = shard_paths(shard_dir, "train")
    vocab = build_vocab(train, True, 24)
    pairs = Pairs(train, vocab, True, 24)
    torch.manual_seed(0)
    model = MRNN(len(vocab), EFFNET_DIM, embed_dim=32, hidden_dim=64, multimodal_dim=64, dropout=0.0, attention=True)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for epoch in range(25):
        loss, _ = run_epoch(model, pairs, 32, opt, seed=epoch)
    ck = tmp / "captioner.pt"
    torch.save({"model_name": "mrnn", "hparams": model.hparams, "state_dict": model.state_dict(), "vocab": vocab.words,
                "epoch": 24, "phrase_pairs": int((pairs.kind == PHRASE).sum()), "config": {}}, ck)
    return ck, shard_dir, loss


def _fit(m: MRNN, feats, kind, toks, steps: int = 150) -> None:
    """Overfit a tiny MRNN on a few sequences (teacher forcing, Adam), then switch it to eval mode."""
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(steps):
        loss = m(feats, kind, toks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()


def test_mrnn_learns_and_decodes():
    """Teacher-forced training fits two sequences; beam search and greedy return them, without BOS/EOS."""
    torch.manual_seed(0)
    for cell in ("gru", "lstm"):
        m = MRNN(12, 8, embed_dim=16, hidden_dim=32, multimodal_dim=32, cell=cell, dropout=0.0)
        feats, kind = torch.eye(8)[:2], torch.tensor([SENTENCE, PHRASE])
        toks = torch.tensor([[4, 5, 6, 7], [8, 9, 0, 0]])
        _fit(m, feats, kind, toks)
        assert [ids for ids, _ in m.beam_search(feats, kind, beam=4)] == [[4, 5, 6, 7], [8, 9]]
        assert [ids for ids, _ in m.greedy(feats, kind)] == [[4, 5, 6, 7], [8, 9]]
        assert all(lp <= 0 for _, lp in m.beam_search(feats, kind, beam=4))


def test_no_repeat_ngram_blocks_loops():
    """A model trained to loop ("4 5 6 4 5 6") repeats itself without blocking and never repeats a trigram with
    it; block_repeats bans exactly the tokens that would complete an earlier n-gram."""
    from densevse.models.mrnn import block_repeats

    torch.manual_seed(0)
    m = MRNN(12, 8, embed_dim=16, hidden_dim=32, multimodal_dim=32, dropout=0.0)
    feats, kind, toks = torch.eye(8)[:1], torch.tensor([SENTENCE]), torch.tensor([[4, 5, 6, 4, 5, 6]])
    _fit(m, feats, kind, toks)
    assert m.beam_search(feats, kind, beam=3)[0][0] == [4, 5, 6, 4, 5, 6]
    ids = m.beam_search(feats, kind, beam=3, no_repeat_ngram=3)[0][0]
    trigrams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    assert ids[:3] == [4, 5, 6] and len(trigrams) == len(set(trigrams)), ids
    logp = torch.zeros(2, 12)
    block_repeats(logp, torch.tensor([[4, 5, 6, 7, 4, 5], [4, 5, 9, 8, 4, 5]]), 3)
    assert torch.isinf(logp[0]).nonzero().flatten().tolist() == [6]
    assert torch.isinf(logp[1]).nonzero().flatten().tolist() == [9]


def test_attention_memory_mask_and_default():
    """Masked memory rows change nothing; no memory = attend to the input's own feature; old checkpoints
    (no "attention" in hparams) rebuild without attention."""
    torch.manual_seed(0)
    m = MRNN(12, 8, embed_dim=16, hidden_dim=32, multimodal_dim=32, dropout=0.0, attention=True).eval()
    feats, kind, toks = torch.randn(3, 8), torch.tensor([SENTENCE, SENTENCE, PHRASE]), torch.tensor([[4, 5, 6]] * 3)
    mem = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    garbage = torch.where(mask[..., None], mem, torch.full_like(mem, 1e3))
    assert torch.allclose(m(feats, kind, toks, mem, mask), m(feats, kind, toks, garbage, mask))
    own = torch.stack([feats, torch.randn(3, 8)], 1)
    assert torch.allclose(m(feats, kind, toks), m(feats, kind, toks, own, torch.tensor([[1, 0]] * 3, dtype=torch.bool)))
    assert m.beam_search(feats, kind, beam=2, memory=mem, mask=mask) == \
        m.beam_search(feats, kind, beam=2, memory=garbage, mask=mask)
    hp = {k: v for k, v in MRNN(12, 8).hparams.items() if k != "attention"}
    assert not MRNN(**hp).hparams["attention"] and not hasattr(MRNN(**hp), "att_query")


def test_mrnn_hparams_rebuild_with_word_vectors():
    """Pretrained word vectors set the embedding size; the stored hparams must rebuild the same model."""
    m = MRNN(6, 4, embed_dim=128, hidden_dim=8, multimodal_dim=8, word_init=np.zeros((6, 50), np.float32))
    assert m.hparams["embed_dim"] == 50
    MRNN(**m.hparams).load_state_dict(m.state_dict())


def test_region_phrases_follow_gold_links(tiny):
    """Each gold-linked object NP pairs with the region whose box is its gold box, and names that object."""
    _, shard_dir, _ = tiny
    s = next(iter_samples(shard_paths(shard_dir, "train")[:1]))
    pairs = region_phrases(s)
    labels = s["meta"]["gold"]["labels"]  # "red circle", in region order (rows 1..)
    assert pairs and len({r for r, _ in pairs}) >= 2
    for row, words in pairs:
        assert words[-2:] == labels[row - 1].split()


def test_dense_description_rule():
    boxes = [[100, 0, 120, 20], [0, 0, 20, 20], [50, 0, 70, 20], [5, 5, 25, 25]]
    phrases = ["a blue square", "a red circle", "a green star", "a red circle"]
    assert dense_description(phrases, boxes) == "a red circle, a green star and a blue square"
    assert dense_description(["a red circle"], boxes[:1]) == "a red circle"
    assert dense_description(["a red circle", "a red circle"], boxes[:2]) == "a red circle"
    assert dense_description([], np.zeros((0, 4))) == ""


def test_dedup_boxes_keeps_detector_order():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    assert dedup_boxes(boxes, 10).tolist() == boxes[[0, 2, 3]].tolist()
    assert len(dedup_boxes(boxes, 2)) == 2
    assert dedup_boxes(np.zeros((0, 4)), 5).shape == (0, 4)


def test_nn_baseline_and_object_metrics():
    train = np.array([[1, 0], [0, 1]], np.float32)
    assert nearest_captions(train, ["x", "y"], np.array([[0.1, 0.9], [2, 0.1]])) == ["y", "x"]
    labels = [["small red circle", "large blue square"]]
    assert object_precision(["a red circle left of a blue square"], labels) == 100.0
    assert object_precision(["a red square and a blue circle"], labels) == 0.0
    assert object_recall(["a red circle"], labels) == 50.0


def test_tiny_captioner_names_objects(tiny):
    """On held-out fixture images the generated phrases name the right colour and shape."""
    ck, shard_dir, loss = tiny
    cap = Captioner.load(ck)
    test = list(iter_samples(shard_paths(shard_dir, "test")))
    phrases = [p for s in test for p, _ in cap.describe(s["feats"][1:], PHRASE, beam=3)]
    labels = [lab for s in test for lab in s["meta"]["gold"]["labels"]]
    hits = sum(p.split()[-2:] == lab.split() for p, lab in zip(phrases, labels))
    assert hits >= 0.8 * len(labels), list(zip(phrases, labels))
    # The whole-image row is the sum of the regions' (colour + shape) codes, so which colour goes with which
    # shape is only in the region rows: the caption attends over them (a pooled-only m-RNN scored ~60-75 here).
    captions = [t for t, _ in cap.caption([s["feats"] for s in test], beam=3)]
    assert object_precision(captions, [s["meta"]["gold"]["labels"] for s in test]) >= 80.0, captions


def test_caption_rejects_malformed_region_features(tiny):
    """Attention memory of the wrong width, empty, or one array short: a ValueError naming the shapes."""
    ck, shard_dir, _ = tiny
    cap = Captioner.load(ck)
    f = next(iter_samples(shard_paths(shard_dir, "test")))["feats"]
    for images in ([f[:, :100]], [f[:0]], [f, f]):
        with pytest.raises(ValueError, match=r"images must be one \(R, 1280\) array"):
            cap.describe(f[:1], SENTENCE, beam=2, images=images)
    assert cap.caption([f], beam=2)[0][0]  # the well-formed input still captions


def test_one_loader_builds_what_the_checkpoint_holds(tiny, tmp_path, capsys):
    """load_trained reads model_name: a captioner from its file, a checkpoint dir or an output dir (its best.pt);
    an embedding model as (model, vocab, labels, checkpoint); the other kind than needed is refused naming both,
    and `densevse describe --model` says so in one line."""
    import shutil

    from densevse.models import new_embedding_model
    from densevse.pipeline.config import TrainConfig
    from densevse.pipeline.errors import ModelMismatch
    from densevse.pipeline.trained import CAPTIONER, EMBEDDING, best_path, load_trained

    ck, _, _ = tiny
    out, ckdir = tmp_path / "run", tmp_path / "checkpoint_000001"
    best_path(out, CAPTIONER).parent.mkdir(parents=True)
    shutil.copy(ck, best_path(out, CAPTIONER))
    ckdir.mkdir()
    shutil.copy(ck, ckdir / "model.pt")
    assert all(isinstance(load_trained(p, CAPTIONER), Captioner) for p in (ck, ckdir, out))
    with pytest.raises(ModelMismatch, match="holds a mrnn captioner model, not the embedding model"):
        load_trained(ck, EMBEDDING)
    with pytest.raises(FileNotFoundError, match="densevse captioner train"):
        load_trained(tmp_path / "nothing", CAPTIONER)

    m = new_embedding_model("vse", TrainConfig(hidden_dim=8, embed_dim=8), vocab_size=4, n_labels=3, feat_dim=16)
    emb = tmp_path / "vse.pt"
    torch.save({"model_name": "vse", "hparams": m.hparams, "state_dict": m.state_dict(), "vocab": ["<pad>", "<unk>",
                "a", "b"], "labels": ["<pad>", "<unk>", "x"]}, emb)
    model, vocab, labels, got = load_trained(emb, EMBEDDING)
    assert not model.training and len(vocab) == 4 and len(labels) == 3 and got["model_name"] == "vse"
    with pytest.raises(ModelMismatch, match="holds a vse embedding model, not the captioner model"):
        load_trained(emb, CAPTIONER)
    assert main(["describe", str(_png(tmp_path / "a.png")), "--model", str(emb)]) == 2
    assert "densevse describe: " in capsys.readouterr().err


def _png(path, color=(200, 30, 30)):
    img = Image.new("RGB", (96, 80), (90, 90, 90))
    img.paste(color, (20, 20, 50, 50))
    img.save(path)
    return path


def test_describe_cli_whole_image_and_bad_file(tiny, tmp_path, capsys):
    """gold_boxes cannot propose regions for a new image: caption only, said so; unreadable file -> exit 2."""
    ck, _, _ = tiny
    good, bad = _png(tmp_path / "good.png"), tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    args = ["describe", str(good), str(bad), "--model", str(ck), "--draw", str(tmp_path / "out.png"),
            "-s", "stages.regions.impl=gold_boxes", "-s", "stages.regions.params={}", "-s", "captioner.beam_size=2"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "bad.jpg" in err and "not a decodable image" in err
    assert "cannot propose regions" in err
    (r,) = json.loads(out)
    assert r["image"] == str(good) and r["caption"] and r["regions"] == [] and r["dense"] == ""
    assert (tmp_path / "out-good.png").stat().st_size > 0
    assert main(["describe", str(tmp_path / "missing.png"), "--model", str(ck)]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_no_regions_above_threshold_still_captions(tiny, tmp_path):
    """A proposer that finds nothing (every detection under the threshold) leaves the whole-image caption."""
    ck, _, _ = tiny
    cfg = _cfg(tmp_path)
    d = Describer(cfg, Captioner.load(ck), propose=lambda jpegs: [np.zeros((0, 4), np.float32) for _ in jpegs])
    r = d.describe(_png(tmp_path / "a.png"))
    assert r["caption"] and r["regions"] == [] and r["dense"] == "" and "no region" in r["note"]
    d.propose = lambda jpegs: [np.array([[10, 10, 60, 60], [12, 10, 60, 60], [0, 0, 30, 40]], np.float32)]
    r = d.describe(tmp_path / "a.png")
    assert len(r["regions"]) == 2 and all(x["phrase"] for x in r["regions"]) and r["dense"]


def test_captioner_config_keys():
    cfg = load_config("pipeline.yaml", ["captioner.beam_size=3"])
    assert cfg.captioner.beam_size == 3 and cfg.captioner.registered_model == "densevse-captioner"
    assert load_config(None).captioner.beam_size == 7
    with pytest.raises(Exception, match="captioner.beam"):
        load_config(None, ["captioner.beam=3"])


@pytest.mark.slow
def test_train_evaluate_register_end_to_end(tmp_path, monkeypatch):
    """Ray Train (1 worker) + MLflow (sqlite) + pycocoevalcap on fixture shards: trained, registered, scored
    (with the NN baseline) and logged; region phrases name their objects; the registered model captions.
    The sqlite URI is relative: the Ray worker, in another directory, must still log into this store."""
    import mlflow
    import pandas as pd

    from densevse.pipeline.evaluation.captions import evaluate_captioner
    from densevse.pipeline.tracking.server import absolute_uri
    from densevse.pipeline.training.tasks import train

    shard_dir = write_fixture_shards(tmp_path / "shards", n_train=60, n_val=10, n_test=20, feat_dim=32)
    cfg = _cfg(tmp_path, f"shards.dir={shard_dir}", "captioner.epochs=12", "captioner.batch_size=32",
               "captioner.lr=0.005", "mlflow.tracking_uri=sqlite:///mlflow.db", "ray.num_cpus=2")
    monkeypatch.chdir(tmp_path)
    summary = train(cfg, "captioner")
    assert summary["epochs"] == 12 and summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    assert int(summary["registered_version"]) == 1
    out = evaluate_captioner(cfg)
    # The fixture has 16 (colour, shape) kinds: the nearest training image often shows the very same objects,
    # so NN retrieval is strong here; the README compares with it on the real synthetic set.
    assert out["caption_CIDEr"] > 0.5 and out["nn_CIDEr"] > 0 and out["caption_object_precision"] >= 50.0, out
    assert out["dense_object_precision"] >= 80.0 and out["dense_object_recall"] >= 80.0, out
    run = mlflow.MlflowClient(absolute_uri(cfg.mlflow.tracking_uri)).get_run(summary["mlflow_run_id"])
    assert "test_caption_CIDEr" in run.data.metrics and "train_loss" in run.data.metrics
    mlflow.set_tracking_uri(absolute_uri(cfg.mlflow.tracking_uri))
    model = mlflow.pyfunc.load_model("models:/densevse-captioner/1")
    s = next(iter_samples(shard_paths(shard_dir, "test")))
    pred = model.predict(pd.DataFrame({"feats": [s["feats"][0].tolist(), s["feats"][1].tolist()],
                                       "kind": ["caption", "phrase"], "regions": [s["feats"].tolist(), None]}))
    assert pred["text"][1].split()[-2:] == s["meta"]["gold"]["labels"][0].split()
    c = cfg.captioner  # the registered model attends over the regions given, as the trained checkpoint does
    assert pred["text"][0] == Captioner.load(summary["best_model"]).caption([s["feats"]], c.beam_size, c.max_len)[0][0]
