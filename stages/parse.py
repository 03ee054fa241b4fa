"""Parse stage: every caption -> a constituency tree (models/trees.py format) and its phrases, with real Stanza.

`stanza` runs a `tokenize,pos,constituency` stanza.Pipeline, loaded once per Ray actor (uses_model = True), and
parses ALL captions of a batch in one bulk call (Stanza batches them internally by length), rather than one
call per caption: per-call overhead dominates for short captions (see bench/bench_parse.py).

Models: by default the offline models made by `densevse parser train` (`model_dir: .cache/parser/stanza-synthetic`,
its models.json fills the paths below; the run's prepare step trains them once when missing). Or Stanza's real
English models: `densevse models download` once, online, then `model_dir:` the directory it prints (null: Stanza's
default directory). A user-given directory or path that does not exist fails up front, naming it.

Tokenization: by default our deterministic PTB-style `tokenize` + `tokenize_pretokenized=True` (one caption is
one sentence, and tokens are stable across runs and Stanza versions). Set `tokenize_pretokenized: false` to
use Stanza's own tokenizer model (with no sentence splitting, so a caption still yields one tree).

Bad captions never crash the stage: each is moved to the row's caption_rejects with its reason (empty,
undecodable bytes, no words, not English, Stanza failure); over-long captions are truncated to max_tokens
(marked with "truncated_from"); a sample with no surviving caption gets row["reject"].
"""
from __future__ import annotations

import json
import logging
import re
import unicodedata
from typing import ClassVar

from pydantic import Field

from densevse.models import trees as T
from densevse.models.parser import DEFAULT_DIR, build_pipeline
from densevse.stages.base import PARSE, Params as StageParams, Stage, is_transient
from densevse.stages.gold import attach_tree
from densevse.stages.text import clean_caption

log = logging.getLogger("densevse.parse")

# ---------------------------------------------------------------- tokenizer

_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"(?i:n't|'s|'re|'ve|'ll|'d|'m)\b|\d+(?:[.,:]\d+)*|\w+(?:[-'’]\w+)*|\.\.\.|--|[^\w\s]")
_PTB_ESCAPES = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def tokenize(text: str) -> list[str]:
    """Deterministic PTB-style tokenizer: splits punctuation and clitics ("dog's" -> dog 's, "don't" -> do n't),
    keeps hyphenated words and numbers whole, escapes brackets (-LRB- ...) so trees stay bracket-safe."""
    text = _CONTRACTION.sub(r"\1 \2", text)
    toks, quote_open = [], False
    for t in _TOKEN.findall(text):
        if t == '"':  # PTB opening/closing quotes
            t, quote_open = ("''" if quote_open else "``"), not quote_open
        toks.append(_PTB_ESCAPES.get(t, t))
    return toks


# ---------------------------------------------------------------- input checks

# Frequent English function words: a long caption with none of them is almost surely not English.
_EN_FUNCTION = frozenset("""a an the is are was were be being been of in on at to with and or but for from by as
into onto near under over its his her their this that these those some two three there here while he she it they
who which what has have his up down out off through next behind front top side""".split())


def check_text(text) -> tuple[str | None, str | None]:
    """(clean text, None) or (None, rejection reason): stages/text.py's checks + mostly non-Latin script."""
    clean, reason = clean_caption(text)
    if reason:
        return None, reason
    letters = [c for c in clean if c.isalpha()]
    non_latin = sum(1 for c in letters if not ("a" <= c.lower() <= "z")
                    and not unicodedata.name(c, "").startswith("LATIN"))
    if non_latin / len(letters) > 0.3:
        return None, "not English (mostly non-Latin script)"
    return clean, None


def looks_english(tokens: list[str]) -> bool:
    """Captions of 8+ words need an English function word (telegraphic ones like "dog sniffing recently cut tree
    stump ." pass: Flickr8k has such captions of 6-7 words)."""
    words = [t.lower() for t in tokens if any(c.isalpha() for c in t)]
    return len(words) < 8 or any(w in _EN_FUNCTION for w in words)


# ---------------------------------------------------------------- Stanza

@PARSE.register("stanza")
class StanzaParse(Stage):
    """Constituency trees + phrases for every caption, one bulk Stanza call per batch."""

    name = "parse"
    uses_model = True

    class Params(StageParams):
        model_paths: ClassVar[tuple[str, ...]] = ("model_dir", "tokenize_model_path", "pos_model_path",
                                                  "constituency_model_path", "pretrain_path")
        lang: str = "en"
        # A `densevse parser train` dir (has models.json), or a Stanza resources dir (null: Stanza's default dir)
        model_dir: str | None = str(DEFAULT_DIR)
        tokenize_model_path: str | None = None
        pos_model_path: str | None = None
        constituency_model_path: str | None = None
        pretrain_path: str | None = None  # word vectors for pos + constituency
        tokenize_pretokenized: bool = True  # our tokenizer (True) or Stanza's tokenizer model (False)
        max_tokens: int = Field(50, ge=1)  # longer captions are truncated to this many tokens
        pos_batch_size: int = Field(3000, ge=1)  # Stanza's unit: words
        constituency_batch_size: int = Field(64, ge=1)  # sentences
        english_check: bool = True  # reject long captions without any English function word
        device: str = "cpu"
        num_threads: int | None = Field(1, ge=1)  # torch intra-op threads per actor; None leaves torch's default

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        if p.num_threads:  # small LSTMs: extra threads only contend with the other actors on the node
            import torch

            torch.set_num_threads(p.num_threads)
        self.nlp = build_pipeline(
            lang=p.lang, model_dir=p.model_dir, tokenize_pretokenized=p.tokenize_pretokenized,
            tokenize_model_path=p.tokenize_model_path, pos_model_path=p.pos_model_path,
            constituency_model_path=p.constituency_model_path, pretrain_path=p.pretrain_path, device=p.device,
            pos_batch_size=p.pos_batch_size, constituency_batch_size=p.constituency_batch_size)

    # ---- core: texts -> trees
    def _prepare_text(self, text) -> tuple[list[str] | str | None, int, str | None]:
        """(input for Stanza, original token count, None) or (None, 0, reason)."""
        clean, reason = check_text(text)
        if reason:
            return None, 0, reason
        if self.params.tokenize_pretokenized:
            toks = tokenize(clean)
            if not toks:
                return None, 0, "empty caption"
            if self.params.english_check and not looks_english(toks):
                return None, 0, "not English (no English function words)"
            return toks[: self.params.max_tokens], len(toks), None
        if self.params.english_check and not looks_english(clean.split()):
            return None, 0, "not English (no English function words)"
        return clean, 0, None

    def _run(self, inputs: list) -> list:
        """One bulk Stanza call; returns one tree dict (or an Exception) per input."""
        import stanza

        if self.params.tokenize_pretokenized:
            doc = self.nlp(inputs)  # list of token lists: one sentence each, parsed together
            sents = [[s] for s in doc.sentences]
        else:
            docs = self.nlp.bulk_process([stanza.Document([], text=t) for t in inputs])
            sents = [d.sentences for d in docs]
            # Stanza's tokenizer sees raw text: over max_tokens is rejected after tokenizing (parse_texts)
        if len(sents) != len(inputs):
            raise RuntimeError(f"Stanza returned {len(sents)} sentences for {len(inputs)} captions")
        return [self._to_tree(ss, inp) for ss, inp in zip(sents, inputs)]

    def _to_tree(self, sentences, inp):
        try:
            if len(sentences) != 1:
                raise ValueError(f"caption split into {len(sentences)} sentences")
            tree = T.from_ptb(str(sentences[0].constituency))
            T.validate(tree)
            if isinstance(inp, list) and tree["tokens"] != inp:
                raise ValueError("parser changed the tokens")
            return tree
        except Exception as e:  # noqa: BLE001 - becomes this caption's rejection reason
            return e

    def parse_tokens(self, sentences: list[list[str]]) -> list:
        """A tree (or the Exception) per already-tokenized sentence, without the caption checks: for scoring
        against a treebank's own words."""
        return self._run(sentences)

    def parse_texts(self, texts: list) -> tuple[list[dict | None], list[str | None]]:
        """Parse many captions at once: (tree or None, rejection reason or None) per text.

        A failing bulk call is retried caption by caption, so one pathological caption costs only itself."""
        prepared = [self._prepare_text(t) for t in texts]
        trees: list[dict | None] = [None] * len(texts)
        reasons: list[str | None] = [r for _, _, r in prepared]
        todo = [i for i, (inp, _, r) in enumerate(prepared) if r is None]
        if not todo:
            return trees, reasons
        try:
            results = self._run([prepared[i][0] for i in todo])
        except Exception:  # noqa: BLE001 - isolate the offending caption(s)
            results = []
            for i in todo:
                try:
                    results.append(self._run([prepared[i][0]])[0])
                except Exception as e:  # noqa: BLE001
                    if is_transient(e):  # out of memory etc.: the shard is retried, never a rejection
                        raise
                    results.append(e)
        for i, res in zip(todo, results):
            if isinstance(res, Exception):
                reasons[i] = f"stanza failed: {type(res).__name__}: {str(res)[:200]}"
                continue
            if not self.params.tokenize_pretokenized and len(res["tokens"]) > self.params.max_tokens:
                reasons[i] = f"too long ({len(res['tokens'])} tokens > max_tokens {self.params.max_tokens})"
                continue
            trees[i] = res
        return trees, reasons

    # ---- rows
    def process(self, rows: list[dict]) -> list[dict]:
        """All captions of all accepted rows in one parse_texts call, then written back per row."""
        refs, texts = [], []
        for r, row in enumerate(rows):
            if row["reject"]:
                continue
            try:
                caps = json.loads(row["captions"])
                rejects = json.loads(row.get("caption_rejects") or "[]")
            except (TypeError, ValueError) as e:
                row["reject"] = f"{self.name}: captions field is not JSON ({e})"
                continue
            row["_caps"], row["_rejects"] = caps, rejects
            for c, cap in enumerate(caps):
                refs.append((r, c))
                texts.append(cap.get("text") if isinstance(cap, dict) else cap)
        trees, reasons = self.parse_texts(texts) if texts else ([], [])
        for (r, c), tree, reason in zip(refs, trees, reasons):
            cap = rows[r]["_caps"][c]
            if not isinstance(cap, dict):
                cap = rows[r]["_caps"][c] = {"index": c, "text": cap}
            if tree is None:
                cap["reason"] = reason
                continue
            n_orig = len(tokenize(check_text(cap["text"])[0])) if self.params.tokenize_pretokenized else 0
            if n_orig > len(tree["tokens"]):
                cap["truncated_from"] = n_orig
            rows[r]["_caps"][c] = attach_tree(cap, tree)
        for row in rows:
            if "_caps" not in row:
                continue
            caps, rejects = row.pop("_caps"), row.pop("_rejects")
            kept = [c for c in caps if "tree" in c]
            for c in caps:
                if "tree" not in c:
                    text = c.get("text")
                    if isinstance(text, (bytes, bytearray)):
                        text = bytes(text).decode("utf-8", "replace")
                    elif isinstance(text, str):  # lone surrogates would break UTF-8 writers downstream
                        text = text.encode("utf-8", "replace").decode("utf-8")
                    rejects.append({"index": c.get("index"), "text": text, "reason": c.get("reason", "unknown")})
            row["captions"] = json.dumps(kept, ensure_ascii=False)
            row["caption_rejects"] = json.dumps(rejects, ensure_ascii=False)
            if not kept:
                row["reject"] = f"{self.name}: no caption survived parsing" + (
                    f" ({rejects[-1]['reason']})" if rejects else " (no captions)")
        return rows


def caption_stats(rows: list[dict]) -> dict:
    """Parsed / rejected caption counts (by reason) and phrases per parsed caption, over processed rows.
    Reasons are grouped by their text before the first ':' or '(' so counts stay readable."""
    from collections import Counter

    n_phrases, reasons, labels, truncated = [], Counter(), Counter(), 0
    for row in rows:
        for c in json.loads(row["captions"]):
            if "tree" in c:  # rows rejected by an earlier stage carry unparsed captions
                n_phrases.append(len(c["phrases"]))
                labels.update(p["label"] for p in c["phrases"])
                truncated += "truncated_from" in c
        for r in json.loads(row["caption_rejects"]):
            reasons[re.split(r"[:(]", r["reason"])[0].strip()] += 1
    n = len(n_phrases)
    return {"parsed": n, "rejected": sum(reasons.values()), "reject_reasons": dict(reasons.most_common()),
            "truncated": truncated, "phrases_per_caption": round(sum(n_phrases) / max(1, n), 2),
            "phrases_hist": dict(sorted(Counter(min(k, 10) for k in n_phrases).items())),
            "phrase_labels": dict(labels.most_common())}
