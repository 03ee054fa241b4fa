"""Parse stage with REAL Stanza on CPU: a tiny tagger + parser is trained once per session (cached on disk by
its inputs' hash, so later sessions reuse it), then trees, phrases, rejections and F1 are checked."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from densevse.models import trees as T
from densevse.stages.base import empty_row
from densevse.stages.parse import check_text, looks_english, tokenize

FLICKR = Path(__file__).parents[1].parent / "shared" / "data" / "flickr8k-1k" / "Flickr8k.token.txt"
TINY_DIR = Path(tempfile.gettempdir()) / "densevse-test-parser"


# ---------------------------------------------------------------- no model needed

def test_tokenize_is_ptb_style():
    assert tokenize('A dog\'s ball (red), "big" isn\'t 3.5 m-long...') == [
        "A", "dog", "'s", "ball", "-LRB-", "red", "-RRB-", ",", "``", "big", "''", "is", "n't", "3.5", "m-long", "..."]
    assert tokenize("a red circle above a blue square") == "a red circle above a blue square".split()


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("   \t ", "empty"), ("!!! ... ???", "no words"), ("12 34", "no words"),
    ("这是一只狗在草地上跑", "not English"), (b"\xff\xfe a dog", "not valid UTF-8"), ("a dog \udcff", "not valid UTF-8"),
    ("a dog \ufffd runs", "not valid UTF-8"), (None, "not text"),
])
def test_check_text_rejects(text, reason):
    clean, why = check_text(text)
    assert clean is None and reason in why


@pytest.mark.parametrize("text", ["", "  ", "!!! 42", b"caf\xe9", "bad \ufffd", "a \udcff", None])
def test_ingest_and_parse_give_one_reason_per_cause(text):
    """The reject histogram counts a cause once: ingest and parse word it the same way."""
    from densevse.stages.ingest import check_caption

    assert check_caption(text, max_words=60)[1] == check_text(text)[1] is not None


def test_english_heuristic():
    assert looks_english(tokenize("Two dogs playing outside"))  # short: no function word needed
    assert looks_english(tokenize("A child in a pink dress is climbing up a set of stairs ."))
    assert not looks_english(tokenize("Un chien noir court dans le parc avec une balle rouge"))


def test_synthetic_treebank_round_trips():
    from densevse.pipeline.datasets.synthetic import treebank

    for s in treebank(200, seed=5):
        t = T.from_ptb(s)
        T.validate(t)
        assert T.to_ptb(t) == s
        assert tokenize(" ".join(t["tokens"])) == t["tokens"]  # our tokenizer reproduces the treebank's tokens


def test_params_validate_in_config():
    from densevse.pipeline.config import parse_config

    cfg = parse_config({"stages": {"parse": {"impl": "stanza", "params": {"model_dir": "x", "max_tokens": 30}}}})
    assert cfg.stages.parse.params.max_tokens == 30  # typed, validated once
    with pytest.raises(Exception, match="max_tokens"):
        parse_config({"stages": {"parse": {"impl": "stanza", "params": {"max_tokens": 0}}}})


# ---------------------------------------------------------------- real Stanza (trained here, offline)

@pytest.fixture(scope="session")
def tiny_models():
    from densevse.pipeline.stage_models.parser import TrainSpec, train

    return train(TINY_DIR, TrainSpec(n_trees=600, tagger_steps=60, parser_epochs=3))


@pytest.fixture(scope="session")
def stage(tiny_models):
    from densevse.stages.parse import StanzaParse

    return StanzaParse({"model_dir": str(TINY_DIR), "max_tokens": 20})


@pytest.mark.slow
def test_trained_dir_is_cached_and_f1_recorded(tiny_models):
    from densevse.pipeline.stage_models.parser import TrainSpec, train

    again = train(TINY_DIR, TrainSpec(n_trees=600, tagger_steps=60, parser_epochs=3))
    assert again["cached"] and again["inputs_hash"] == tiny_models["inputs_hash"]
    saved = json.loads((TINY_DIR / "models.json").read_text())
    assert saved["bracket_f1"] >= 0.95, saved["eval"]
    for k in ("pos_model_path", "constituency_model_path", "pretrain_path"):
        assert (TINY_DIR / saved[k]).is_file()


@pytest.mark.slow
def test_bracket_f1_on_fresh_heldout_trees(stage):
    from densevse.pipeline.datasets.synthetic import treebank

    gold = [T.from_ptb(s) for s in treebank(150, seed=999)]  # a seed the parser never trained on
    pred, reasons = stage.parse_texts([" ".join(g["tokens"]) for g in gold])
    assert reasons == [None] * len(gold)
    f1 = T.bracket_f1(gold, pred)
    print(f"held-out bracket F1 = {f1:.4f}")
    assert f1 >= 0.95


@pytest.mark.slow
def test_rows_get_trees_phrases_and_rejections(stage):
    long = " ".join(["a red circle above a blue square and"] * 10)
    caps = [{"index": 0, "text": "a red circle is above a blue square"},
            {"index": 1, "text": ""},
            {"index": 2, "text": "?!?! ..."},
            {"index": 3, "text": "这是一只狗在草地上跑"},
            {"index": 4, "text": "a dog \udcff\udcfe"},
            {"index": 5, "text": long},
            {"index": 6, "text": "Un chien noir court dans le parc avec une balle rouge"},
            {"index": 7, "text": "A green star and a small red diamond ."}]
    good = empty_row(key="s0", captions=json.dumps(caps))
    bad = empty_row(key="s1", captions=json.dumps([{"index": 0, "text": "   "}, {"index": 1, "text": "%%%"}]))
    already = empty_row(key="s2", captions=json.dumps(caps[:1]), reject="ingest: broken image")
    out = stage.process([good, bad, already])

    kept = json.loads(out[0]["captions"])
    assert [c["index"] for c in kept] == [0, 5, 7]
    for c in kept:
        T.validate(c["tree"])
        assert T.from_ptb(T.to_ptb(c["tree"])) == c["tree"]  # tree survives the PTB round trip
        assert all(p["text"] == " ".join(c["tree"]["tokens"][p["start"]:p["end"]]) for p in c["phrases"])
    assert kept[0]["tree"]["tokens"] == "a red circle is above a blue square".split()
    assert {"NP", "VP"} <= {p["label"] for p in kept[0]["phrases"]}
    assert len(kept[1]["tree"]["tokens"]) == 20 and kept[1]["truncated_from"] == 80
    rejects = {r["index"]: r["reason"] for r in json.loads(out[0]["caption_rejects"])}
    assert set(rejects) == {1, 2, 3, 4, 6}
    assert "empty" in rejects[1] and "no words" in rejects[2] and "not English" in rejects[3]
    assert "UTF-8" in rejects[4] and "not English" in rejects[6]
    json.loads(out[0]["caption_rejects"]).__str__().encode("utf-8")  # writable as UTF-8 (no lone surrogates)
    assert out[0]["reject"] == ""
    assert out[1]["reject"].startswith("parse: no caption survived")
    assert len(json.loads(out[1]["caption_rejects"])) == 2
    assert out[2]["reject"] == "ingest: broken image" and out[2]["captions"] == already["captions"]


@pytest.mark.slow
def test_stage_runs_as_ray_batch_adapter(stage):
    import numpy as np

    rows = [empty_row(key=f"k{i}", captions=json.dumps([{"index": 0, "text": "a blue square below a red star"}]))
            for i in range(3)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = stage(batch)
    assert all(json.loads(c)[0]["phrases"] for c in out["captions"])


@pytest.mark.slow
@pytest.mark.skipif(not FLICKR.is_file(), reason="../shared/data absent: flickr8k-1k")
def test_flickr8k_captions_parsed_or_rejected(stage):
    """All 5,000 real captions (out of the synthetic domain), through the stage as preprocessing runs it: every
    caption is parsed into a valid tree or rejected with a reason. Figures: bench/bench_parse.py --flickr8k."""
    from densevse.pipeline.datasets.flickr8k import parse_token_file
    from densevse.stages.parse import caption_stats

    by_image = parse_token_file(FLICKR)
    rows = [empty_row(key=f"f{k}", captions=json.dumps([{"index": i, "text": t} for i, t in enumerate(caps)]))
            for k, caps in enumerate(by_image.values())]
    out = [r for i in range(0, len(rows), 64) for r in stage.process(rows[i:i + 64])]
    for row in out:
        for c in json.loads(row["captions"]):
            T.validate(c["tree"])
        assert all(r["reason"] for r in json.loads(row["caption_rejects"]))
    stats = caption_stats(out)
    print(json.dumps(stats))
    assert stats["parsed"] + stats["rejected"] == sum(len(c) for c in by_image.values()) == 5000
    assert stats["parsed"] >= 0.9 * 5000 and stats["phrases_per_caption"] > 1


@pytest.mark.parametrize("params,named", [
    ({"model_dir": "/nonexistent/stanza_dir"}, "/nonexistent/stanza_dir"),
    ({"model_dir": str(Path(__file__).parent)}, "no Stanza models"),  # exists, but holds no models
    ({"pos_model_path": "/nonexistent/tagger.pt"}, "/nonexistent/tagger.pt"),
])
def test_prepare_fails_up_front_naming_missing_models(params, named):
    from densevse.pipeline.config import parse_config
    from densevse.pipeline.errors import ConfigError
    from densevse.pipeline.preprocess.prepare import prepare_stage_models

    cfg = parse_config({"stages": {"regions": {"impl": "gold_boxes"}, "parse": {"impl": "stanza", "params": params}}})
    with pytest.raises(ConfigError, match="stages.parse.params") as e:
        prepare_stage_models(cfg)
    assert named in str(e.value)


@pytest.mark.slow  # DNS failures take ~20 s here
def test_models_download_offline_is_a_clear_error(tmp_path, capsys):
    """Real stanza.download: online it fetches the models; offline (as in CI here) it must fail in one clear line."""
    from densevse.pipeline.cli.main import main

    rc = main(["models", "download", "--dir", str(tmp_path / "stanza")])
    err = capsys.readouterr().err
    if rc == 0:
        pytest.skip("online: the models were downloaded")
    assert rc == 1 and "raw.githubusercontent.com/stanfordnlp" in err and str(tmp_path / "stanza") in err
    assert "Traceback" not in err
