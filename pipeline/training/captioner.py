"""The description model's training: its pairs from the shards, and its task for the shared Ray Train loop.

    summary = train(cfg, "captioner")   # tasks.py; best epoch -> <output_dir>/models/captioner/best.pt (+ MLflow)
    summary = train(cfg, "captioner", resume=True)  # continue from the latest checkpoint
    cap = load_trained(path, CAPTIONER) # trained.py; cap.describe(feats, kind) -> [(text, score)]

Training pairs (one decoder, two kinds of output, see models/mrnn.py):
  * sentence: whole-image feature (row 0 of feats.npy) -> each caption's tokens;
  * phrase: a region's feature -> the noun phrase linked to it. Gold links (synthetic set: caption -> object NP
    token span -> gold box) name a gold box; the region is the shard's proposal (rows 1..) with the highest
    IoU >= 0.5 with it, so this works with gold_boxes regions and with detector proposals alike. Without gold
    links (Flickr8k) there are no phrase pairs; region descriptions then come from the sentence decoder run
    on the region feature (`Captioner.phrase_kind`).

Training is the shared Ray Train loop (pipeline/training/loop.py: cfg.train.num_workers workers,
cfg.train.use_gpu, a checkpoint per epoch, FailureConfig(cfg.train.max_failures), `resume`) with the task
`CaptionerTask`: each rank holds its pairs in memory, rank 0 computes the val loss each epoch; the best epoch
(lowest val loss, else lowest train loss) is kept and registered as cfg.captioner.registered_model.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import torch

from densevse.models.batch import caption_tokens, gold_nodes
from densevse.models.captioner import MODEL_NAME, new_mrnn, pad_images
from densevse.models.metrics import box_iou
from densevse.models.mrnn import MRNN, PHRASE, SENTENCE, SPECIALS
from densevse.models.vocab import Vocab, normalize
from densevse.pipeline.shardset import iter_samples
from densevse.pipeline.training.loop import Task
from densevse.pipeline.trained import CAPTIONER

# ---------------------------------------------------------------- training pairs


def region_phrases(sample: dict, iou: float = 0.5) -> list[tuple[int, list[str]]]:
    """(region row, phrase tokens) of a sample's gold-linked object NPs, deduplicated per region and phrase."""
    gold = sample["meta"].get("gold") or {}
    gboxes = np.asarray(gold.get("boxes", []), np.float32).reshape(-1, 4)
    props = sample["boxes"][1:]
    if not len(gboxes) or not len(props):
        return []
    ious = box_iou(gboxes, props)                     # (G, R-1)
    out, seen = [], set()
    for c in sample["meta"]["captions"]:
        tree = c["tree"]
        for node, b in gold_nodes(c, gold):
            if b >= len(gboxes) or ious[b].max() < iou:
                continue
            s, e = tree["spans"][node]
            row, words = 1 + int(ious[b].argmax()), [normalize(t) for t in tree["tokens"][s:e]]
            if (row, tuple(words)) not in seen:
                seen.add((row, tuple(words)))
                out.append((row, words))
    return out


def sample_pairs(sample: dict, with_phrases: bool, max_len: int) -> list[tuple[int, int, list[str]]]:
    """(feature row, kind, tokens) training pairs of one shard sample; captions over max_len tokens are skipped.
    A sentence describes row 0 (the whole image, attending over every row); a phrase its region's row."""
    pairs = [(0, SENTENCE, caption_tokens(c)) for c in sample["meta"]["captions"]]
    if with_phrases:
        pairs += [(row, PHRASE, words) for row, words in region_phrases(sample)]
    return [p for p in pairs if 0 < len(p[2]) <= max_len]


def build_vocab(paths, with_phrases: bool, max_len: int, min_count: int = 1) -> Vocab:
    counts: Counter = Counter()
    for s in iter_samples(paths):
        for _, _, words in sample_pairs(s, with_phrases, max_len):
            counts.update(words)
    return Vocab(SPECIALS + sorted(w for w, n in counts.items() if n >= min_count))


class Pairs:
    """All pairs of some shards as tensors: each image's feature rows once (float16), and per pair its image,
    row, kind and tokens. A batch gives the pairs' own features plus their attention memory: all rows of the
    image for a sentence, the region's own row for a phrase."""

    def __init__(self, paths, vocab: Vocab, with_phrases: bool, max_len: int):
        images, img, rows, kinds, toks = [], [], [], [], []
        for s in iter_samples(paths):
            pairs = sample_pairs(s, with_phrases, max_len)
            for row, k, words in pairs:
                img.append(len(images))
                rows.append(row)
                kinds.append(k)
                toks.append([vocab(w) for w in words])
            if pairs:
                images.append(s["feats"])
        self.images, self.mask = pad_images(images) if images else (torch.zeros(0, 1, 1), torch.zeros(0, 1, dtype=torch.bool))
        self.images = self.images.half()
        self.img, self.row = torch.tensor(img, dtype=torch.long), torch.tensor(rows, dtype=torch.long)
        self.kind = torch.tensor(kinds, dtype=torch.long)
        self.tokens = torch.zeros(len(toks), max((len(t) for t in toks), default=1), dtype=torch.long)
        for i, t in enumerate(toks):
            self.tokens[i, :len(t)] = torch.tensor(t)

    def __len__(self) -> int:
        return len(self.kind)

    def batches(self, batch_size: int, seed: int | None = None):
        """(feats (B, D), kind (B,), tokens (B, L), memory (B, R, D), mask (B, R)) batches."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if seed is not None \
            else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            j = order[i:i + batch_size]
            toks = self.tokens[j]
            memory, row, kind = self.images[self.img[j]].float(), self.row[j], self.kind[j]
            own = torch.arange(memory.shape[1])[None] == row[:, None]
            mask = torch.where((kind == SENTENCE)[:, None], self.mask[self.img[j]], own)
            yield memory[torch.arange(len(j)), row], kind, toks[:, :int((toks != 0).sum(1).max())], memory, mask


def run_epoch(model, pairs: Pairs, batch_size: int, opt=None, seed: int | None = None, device="cpu",
              grad_clip: float = 2.0) -> tuple[float, int]:
    """One pass (training when opt is given, else evaluation): (mean loss per pair, pairs)."""
    model.train(opt is not None)
    total, n = 0.0, 0
    with contextlib.nullcontext() if opt is not None else torch.no_grad():
        for f, k, t, mem, mask in pairs.batches(batch_size, seed):
            loss = model(f.to(device), k.to(device), t.to(device), mem.to(device), mask.to(device))
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
            total += float(loss.detach()) * len(k)
            n += len(k)
    return total / max(n, 1), n


# ---------------------------------------------------------------- training (pipeline/training/loop.py)


class CaptionerTask(Task):
    """Each rank holds its pairs in memory (Pairs); the val loss picks the best epoch."""

    name, model_name = CAPTIONER, MODEL_NAME
    no_pairs_hint = " (every caption longer than captioner.max_len?)"

    def __init__(self, cfg):
        self.epochs, self.lr = cfg.captioner.epochs, cfg.captioner.lr

    def prepare(self, cfg, paths: list, state: dict | None) -> dict:
        c = cfg.captioner
        if state is not None:
            self.words = state["vocab"]
        else:
            self.words = build_vocab(paths, c.region_phrases, c.max_len, c.min_word_count).words
        if len(self.words) <= len(SPECIALS):
            raise ValueError(f"the train shards in {cfg.shard_dir} hold no caption of at most {c.max_len} tokens")
        self.feat_dim = next(iter_samples(paths[:1]))["feats"].shape[1]
        return {"vocab": len(self.words)}

    def setup(self, cfg, train_paths: list, val_paths: list, device) -> None:
        c = cfg.captioner
        self.cfg, self.device, self.vocab = cfg, device, Vocab(self.words)
        self.train = Pairs(train_paths, self.vocab, c.region_phrases, c.max_len)
        self.val = Pairs(val_paths, self.vocab, c.region_phrases, c.max_len) if val_paths else None

    def make_model(self, hparams: dict | None) -> torch.nn.Module:
        if hparams is not None:
            return MRNN(**hparams)
        word_init = None
        if self.cfg.train.word_vectors == "glove-6b-50d":
            from densevse.models.vocab import glove_init

            word_init = glove_init(self.vocab, seed=self.cfg.train.seed)[0]
        c = self.cfg.captioner
        return new_mrnn(len(self.vocab), self.feat_dim, hidden_dim=c.hidden_dim, cell=c.cell, dropout=c.dropout,
                        attention=c.attention, word_init=word_init)

    def train_epoch(self, model, core, opt, epoch: int) -> tuple[dict[str, float], int]:
        tc = self.cfg.train
        loss, n = run_epoch(model, self.train, self.cfg.captioner.batch_size, opt, seed=tc.seed * 1000 + epoch,
                            device=self.device, grad_clip=tc.grad_clip)
        return {"loss": loss * n}, n

    def evaluate(self, core) -> dict:
        return {"val_loss": run_epoch(core, self.val, 256, device=self.device)[0]} if self.val else {}

    def checkpoint_extra(self) -> dict:
        return {"vocab": self.vocab.words, "phrase_pairs": int((self.train.kind == PHRASE).sum())}

    def best_score(self, entry: dict) -> float:
        return -entry.get("val_loss", entry["train_loss"])

    def register(self, cfg, run_id: str, history: list[dict], best) -> int | None:
        from densevse.pipeline.tracking import registry

        return registry.register_captioner(cfg, run_id, history, best)
