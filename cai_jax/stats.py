"""Small statistics shared by the stages, the judges and the report."""
from __future__ import annotations

import numpy as np


def paired_change(before: dict, after: dict) -> tuple[float, float, int]:
    """Mean of after[k] - before[k] over the keys both hold (prompts), its
    standard error across them (NaN below two) and their number: whether a
    value moved by more than the prompts' noise."""
    diff = np.asarray([float(after[k]) - float(before[k]) for k in before if k in after], np.float64)
    if not len(diff):
        return float("nan"), float("nan"), 0
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se, len(diff)


def sigmoid(x) -> np.ndarray:
    """1 / (1 + exp(-x)): p(A beats B) from the score gap x = score_A - score_B.
    The tanh form never overflows, for gaps of any size."""
    return 0.5 * (1.0 + np.tanh(np.asarray(x, np.float64) / 2.0))
