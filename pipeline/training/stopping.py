"""Early stopping: end training once the validation score has not improved for `patience` epochs.

Pure, so the loop's rank 0 (which decides) and the driver (which reports) apply the same rule to the same history.
"""
from __future__ import annotations

from typing import Callable


def early_stop(history: list[dict], score: Callable[[dict], float], patience: int | None) -> str | None:
    """Why training stops after the last epoch of `history`, or None to go on.

    Stops when the best-scoring epoch (the first of equal scores, as `save_best` picks) is `patience` or more
    epochs behind the last one: a tie is no improvement. `patience` None or 0: never."""
    if not patience or not history:
        return None
    best = max(range(len(history)), key=lambda i: score(history[i]))
    since = len(history) - 1 - best
    if since < patience:
        return None
    what = "validation rsum" if "val_rsum" in history[best] else "validation score"
    return (f"early stop after epoch {history[-1]['epoch']}: {what} not improved for {since} epoch(s) "
            f"(best epoch {history[best]['epoch']}, train.patience={patience})")
