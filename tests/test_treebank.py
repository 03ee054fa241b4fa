"""Real-treebank parser training: reading and normalising PTB files (pure, no Stanza), evalb-style scoring, and
(slow) Stanza's trainers run for a few steps on a slice of the real GUM trees, then loaded by the parse stage."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from densevse.models import trees as T
from densevse.pipeline.stage_models.treebank import normalise, read_splits_md, read_treebank, split_trees
from conftest import GUM, gum_slice, needs_gum

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tree,expected", [
    ("(ROOT (S (NP-SBJ-1 (DT The) (NN dog)) (VP (VBZ runs)) (. .)))",
     "(ROOT (S (NP (DT The) (NN dog)) (VP (VBZ runs)) (. .)))"),  # function tags and indices stripped
    ("( (S (NP=2 (PRP It)) (VP (VBD went))))", "(ROOT (S (NP (PRP It)) (VP (VBD went))))"),  # unlabelled wrapper
    ("(S (NP (-NONE- *T*)) (VP (VB go) (NP (-NONE- *))))", "(ROOT (S (VP (VB go))))"),  # empty elements dropped
    ("(ROOT (NP (-LRB- -LRB-) (NN word) (-RRB- -RRB-)))", "(ROOT (NP (-LRB- -LRB-) (NN word) (-RRB- -RRB-)))"),
])
def test_normalise(tree, expected):
    assert normalise(tree) == (expected, None)
    T.validate(T.from_ptb(expected))


@pytest.mark.parametrize("tree,reason", [
    ("()", "empty tree"),
    ("(ROOT (S (NP (-NONE- *))))", "only empty elements"),
    ("(ROOT (NP (DT a) dog))", "bare token"),
    ("(ROOT (NP (DTX a) (NN dog)))", "unknown tag DTX"),
    ("(ROOT (FOO (DT a) (NN dog)))", "unknown tag FOO"),
    ("(ROOT (VB Understand))", "one word and no phrase"),
    ("(ROOT (S (NP (NN a)) (VP (VB b))) (S (NP (NN c))))", "exactly one constituent"),
])
def test_normalise_rejects_with_reason(tree, reason):
    out, why = normalise(tree)
    assert out is None and reason in why


def test_split_trees_isolates_unbalanced_trees():
    text = ("(ROOT (NP (DT a) (NN dog))\n"          # missing ')': cut at the next tree's column-0 bracket
            "(ROOT (NP (NN cat)))\n"
            "stray (ROOT (NP (NN cow))))\n")        # a bare token, then one ')' too many
    trees, reasons = split_trees(text)
    assert [normalise(t)[0] for t in trees] == ["(ROOT (NP (NN cat)))", "(ROOT (NP (NN cow)))"]
    assert sorted(reasons) == ["bare token outside a tree", "unbalanced brackets (extra ')')",
                               "unbalanced brackets (missing ')')"]


def test_read_treebank_splits_counts_and_rejects(tmp_path):
    (tmp_path / "splits.md").write_text("# Splits\n\n## dev\n\n  * doc_dev\n\n## test\n\n  * doc_test\n\n"
                                        "## test2\n\n  * doc_other\n")
    good = "(ROOT (S (NP-SBJ (DT A) (NN dog)) (VP (VBZ runs))))\n\n"
    (tmp_path / "doc_train.ptb").write_text(good * 3 + "(ROOT (NP (DT a) (NN dog)\n" + "(ROOT (NP (XYZ a)))\n")
    (tmp_path / "doc_dev.ptb").write_text(good)
    (tmp_path / "doc_test.ptb").write_text(good * 2)
    (tmp_path / "doc_other.ptb").write_text(good)
    splits, report = read_treebank(tmp_path)
    assert report["trees"] == {"train": 3, "dev": 1, "test": 2}
    assert report["documents"] == {"train": 1, "dev": 1, "test": 1, "not in the train/dev/test split": 1}
    assert report["rejected"] == {"unbalanced brackets (missing ')')": 1, "unknown tag XYZ": 1}
    assert splits["test"][0] == "(ROOT (S (NP (DT A) (NN dog)) (VP (VBZ runs))))"
    # every tree is accounted for: kept + rejected + left-out documents = what the files hold
    assert sum(report["trees"].values()) + sum(report["rejected"].values()) == 3 + 2 + 1 + 2


def test_dev_trees_with_labels_unseen_in_train_are_set_aside(tmp_path):
    """Stanza's parser trainer refuses them; they are counted, not silently dropped."""
    (tmp_path / "train.mrg").write_text("(ROOT (S (NP (DT A) (NN dog)) (VP (VBZ runs))))\n" * 3)
    (tmp_path / "dev.mrg").write_text("(ROOT (S (NP (DT A) (NN dog)) (VP (VBZ runs))))\n"
                                      "(ROOT (S (NP (PRP It)) (VP (VBZ runs) (ADVP (RB fast)))))\n")
    (tmp_path / "test.mrg").write_text("(ROOT (NP (DT A) (NN dog)))\n")
    _, report = read_treebank(tmp_path)
    assert report["trees"]["dev"] == 1
    assert report["rejected"] == {"dev tree with a label not in train (ADVP)": 1}


def test_read_treebank_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        read_treebank(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no bracket files"):
        read_treebank(tmp_path)
    (tmp_path / "notes.ptb").write_text("(ROOT (NP (NN x)))\n")
    with pytest.raises(ValueError, match="no train trees"):
        read_treebank(tmp_path)


def test_split_names_without_splits_md(tmp_path):
    for name in ("train", "test"):
        (tmp_path / f"{name}.mrg").write_text("(ROOT (NP (DT the) (NN one)))\n" * 20)
    splits, report = read_treebank(tmp_path)
    assert report["trees"] == {"train": 18, "dev": 2, "test": 20}  # no dev file: the last 10% of train
    assert read_splits_md("## dev\n* a\n* b\n## test\n- c\n") == {"dev": {"a", "b"}, "test": {"c"}}


def test_evalb_excludes_punctuation_and_counts_unaries():
    gold = T.from_ptb("(S (NP (DT The) (NN dog)) (VP (VBZ runs) (ADVP (RB fast))) (. .))")
    # the period attached lower: plain bracket F1 counts VP and S spans as different, evalb does not
    pred = T.from_ptb("(S (NP (DT The) (NN dog)) (VP (VBZ runs) (ADVP (RB fast)) (. .)))")
    assert T.bracket_f1([gold], [pred]) < 1.0
    assert T.evalb([gold], [pred])["f1"] == 1.0
    wrong = T.from_ptb("(S (NP (DT The) (NN dog) (VBZ runs)) (ADVP (RB fast)) (. .))")
    r = T.evalb([gold], [wrong])
    assert r["precision"] == pytest.approx(3 / 3 * 2 / 3) and r["recall"] == pytest.approx(2 / 4)
    unary = T.from_ptb("(S (NP (NP (NN Dogs))) (VP (VBP run)))")
    assert sum(T.evalb_brackets(unary).values()) == 4  # S, NP, NP, VP: a unary chain counts twice


@needs_gum
def test_gum_reads_with_its_standard_split():
    splits, report = read_treebank(GUM)
    assert report["documents"]["dev"] == report["documents"]["test"] == 12
    assert 3000 < report["trees"]["train"] and 400 < report["trees"]["dev"] and 400 < report["trees"]["test"]
    assert set(report["rejected"]) <= {"one word and no phrase (a heading): nothing to parse"}
    for t in splits["train"][:200]:
        tree = T.from_ptb(t)
        assert all("-" not in lab or lab.startswith("-") for lab in tree["labels"])  # no function tags left


@needs_gum
@pytest.mark.slow
def test_parser_trains_on_real_gum_slice_and_loads_in_the_stage(tmp_path):
    """Stanza's own tagger and parser trainers on 60 real GUM trees, through the real CLI, then the parse stage."""
    bank = gum_slice(tmp_path / "gum-slice", 20)
    out = tmp_path / "model"
    cmd = [str(ROOT / ".venv" / "bin" / "densevse"), "parser", "train", "--treebank", str(bank), "--out", str(out),
           "--tagger-steps", "10", "--parser-epochs", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained in" in r.stdout
    assert "bracket F1" in r.stdout and "POS acc" in r.stdout
    m = json.loads((out / "models.json").read_text())
    kept = m["treebank"]["trees"]
    assert kept["train"] == kept["test"] == 20 and kept["dev"] + sum(
        n for why, n in m["treebank"]["rejected"].items() if why.startswith("dev tree")) == 20
    assert 0.0 <= m["eval"]["test"]["bracket_f1"] <= 1.0 and m["eval"]["test"]["n_trees"] == 20
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "cached" in again.stdout

    from densevse.stages.parse import StanzaParse

    stage = StanzaParse({"model_dir": str(out)})
    trees, reasons = stage.parse_texts(["A black dog runs across the green grass .", ""])
    assert reasons[0] is None and trees[0]["tokens"][:3] == ["A", "black", "dog"]
    T.validate(trees[0])
    assert trees[1] is None and "empty" in reasons[1]


@needs_gum
@pytest.mark.gpu
def test_parser_trains_on_the_gpu(tmp_path):
    """`densevse parser train --device cuda` on a real GUM slice: Stanza's trainers run on the GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from densevse.pipeline.stage_models.parser import TrainSpec, train

    bank = gum_slice(tmp_path / "gum-slice", 20)
    m = train(tmp_path / "model", TrainSpec.for_treebank(str(bank), tagger_steps=10, parser_epochs=1),
              device="cuda")
    assert m["device"] == "cuda" and 0.0 <= m["eval"]["test"]["bracket_f1"] <= 1.0
