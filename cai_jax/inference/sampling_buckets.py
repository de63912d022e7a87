"""Host-side helpers of the sampler: shape buckets, length-sorted batches,
padding, and cutting answers at stop strings.

Nothing here touches JAX; `cai_jax.inference.sampling` compiles one program per bucket
these helpers choose.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence, Union

import numpy as np

ExampleId = Union[int, str]


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): the size a shape compiles to."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def width_bucket(n: int, minimum: int = 1) -> int:
    """The smallest 2^k or 3 * 2^(k-1) >= max(n, minimum): sequence widths round
    up by less than half (not up to double, as with powers of two), which
    matters when prefill is most of the cost (long few-shot prompts), for at
    most twice the compiled shapes."""
    n = max(int(n), int(minimum), 1)
    power = bucket(n)
    three_quarters = 3 * power // 4
    return three_quarters if three_quarters >= n and power >= 4 else power


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length, longest first (so a too-long batch
    fails, and the slowest shape compiles, before the others run)."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; must be >= 1")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(rows: Sequence[Sequence[int]], num_rows: int, width: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[num_rows, width] tokens and mask, each row's tokens at the right end
    (so every row's next token goes to the same cache slot). Rows beyond
    len(rows) are all padding."""
    tokens = np.full((num_rows, width), pad_id, np.int32)
    mask = np.zeros((num_rows, width), bool)
    for r, row in enumerate(rows):
        if len(row):
            tokens[r, width - len(row):] = row
            mask[r, width - len(row):] = True
    return tokens, mask


def right_pad(rows: Sequence[Sequence[int]], num_rows: int, width: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[num_rows, width] tokens and mask, each row's tokens from column 0."""
    tokens = np.full((num_rows, width), pad_id, np.int32)
    mask = np.zeros((num_rows, width), bool)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = row
        mask[r, :len(row)] = True
    return tokens, mask


def example_key_id(example_id: ExampleId) -> int:
    """A uint32 to fold into the PRNG key: ints as they are (mod 2**32), strings
    through a stable hash (Python's hash() changes between processes)."""
    if isinstance(example_id, (int, np.integer)):
        return int(example_id) % (1 << 32)
    digest = hashlib.sha256(str(example_id).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def find_stop(text: str, stop_strings: Sequence[str]) -> Optional[int]:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def cut_at_stops(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to its earliest stop string (all of it when none occurs)."""
    cut = find_stop(text, stop_strings)
    return text if cut is None else text[:cut]


def tokens_within(tokens: Sequence[int], kept_text: str, decode: Callable[[Sequence[int]], str]) -> int:
    """The largest n such that decode(tokens[:n]) is a prefix of `kept_text`.

    The decoded prefix only grows with n, so a binary search needs log2(len)
    decodes. When a stop string starts inside a token, that token is dropped
    too: the answer's text then ends just before it, and text == decode(tokens)
    still holds.
    """
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kept_text.startswith(decode(tokens[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return lo
