"""One batched forward pass over many token rows, for everything that scores.

The sampler's log-probs, the feedback model's option log-probs, the preference
model's scores and the held-out losses of SL and PM training all run a model
over rows of different lengths. Each needs the same steps: sort rows by length
(so a batch pads little), pad each batch to one of a few widths and row counts
(so few programs compile), split the rows evenly over the mesh, run the jitted
function, drop the filler rows and put the results back in input order. They
are written once here, with one width rule, so the callers differ only in the
function they run.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cai_jax import processes, sharding as shd
from cai_jax.inference.sampling_buckets import (bucket, left_pad, length_sorted_batches, right_pad,
                                                width_bucket)


def padded_width(num_tokens: int, min_width: int, max_width: Optional[int] = None) -> int:
    """The width a batch whose longest row has `num_tokens` tokens is padded to.

    `width_bucket` (2^k or 3 * 2^(k-1), at least min_width, capped at
    max_width): padding stays under a third of the width, where doubling
    widths wastes up to half; and the shapes grow with log(max / min), two per
    doubling (seven from 64 to 512), where multiples of min_width grow
    linearly with the context (64 shapes for 8192 tokens in steps of 128).
    """
    if max_width is not None and num_tokens > max_width:
        raise ValueError(f"a row of {num_tokens} tokens is longer than the limit of {max_width}")
    width = width_bucket(num_tokens, min_width)
    return width if max_width is None else min(width, max_width)


def training_width(num_tokens: int, min_width: int, max_width: int) -> int:
    """The width a training batch is padded to: min_width doubled until the
    longest row fits, capped at max_width (64, 128, 256, 384 for 64 and 384).

    Coarser than `padded_width` on purpose: a train step compiles its backward
    pass and optimizer too, so each extra shape costs far more than a scoring
    shape, and the default run's few dozen steps would spend more on compiling
    than they save on padding.
    """
    if min_width < 1 or max_width < 1:
        raise ValueError(f"widths must be positive (min {min_width}, max {max_width})")
    if num_tokens > max_width:
        raise ValueError(f"a row of {num_tokens} tokens is longer than the limit of {max_width}")
    return min(bucket(num_tokens, min_width), max_width)


def batch_row_multiple(mesh: Optional[Mesh], rules=shd.DEFAULT_RULES) -> int:
    """Batch rows must split evenly over the mesh's batch axes."""
    if mesh is None:
        return 1
    target = dict(rules).get("batch") or ()
    axes = target if isinstance(target, tuple) else (target,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def place_batch(x, mesh: Optional[Mesh], rules=shd.DEFAULT_RULES):
    """A host array on the default device, or split by rows over the mesh."""
    x = np.asarray(x)
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, shd.data_sharding(mesh, x.ndim, rules))


def rows_per_batch(num_rows: int, batch_size: int, multiple: int) -> int:
    """Every batch of a call has the same row count, so it compiles one shape
    per width: batch_size (rounded up to the mesh's multiple), or for a call
    with fewer rows the next power of two, so that scoring one row does not
    run a full batch."""
    full = _round_up(max(1, batch_size), multiple)
    return _round_up(min(full, bucket(num_rows)), multiple)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batched_forward(forward: Callable[..., Any], rows: Sequence[Sequence[int]], *, batch_size: int,
                    min_width: int, max_width: Optional[int] = None, pad_id: int = 0,
                    left: bool = False, token_extras: Sequence[Sequence[Sequence[int]]] = (),
                    mesh: Optional[Mesh] = None, rules=shd.DEFAULT_RULES,
                    on_batch: Optional[Callable[[int], None]] = None) -> list:
    """forward(tokens_bt, mask_bt, *extras_bt) over `rows`, one output per row in input order.

    forward: a jitted function (bind parameters with functools.partial) that
      returns a pytree of [B, ...] arrays; row r's output is every leaf's [r]
      as NumPy. Per-token outputs keep the padded width; the caller cuts them.
    rows: token ids; each batch is padded with pad_id to `padded_width` of
      its longest row, on the right, or on the `left` (so every row's last
      token is in the last column); mask_bt is True on real tokens.
    token_extras: more per-token integer arrays, each with one entry per row
      as long as that row (e.g. a loss mask), padded with 0 like the tokens.
    on_batch: called with the number of rows each batch held (progress bars).
    """
    multiple = batch_row_multiple(mesh, rules)
    num_rows = rows_per_batch(len(rows), batch_size, multiple)
    pad = left_pad if left else right_pad
    results: list = [None] * len(rows)
    for idx in length_sorted_batches([len(r) for r in rows], num_rows):
        width = padded_width(max(len(rows[i]) for i in idx), min_width, max_width)
        # Filler rows hold one real pad token: no row attends to nothing.
        fillers = [[pad_id]] * (num_rows - len(idx))
        tokens_bt, mask_bt = pad([rows[i] for i in idx] + fillers, num_rows, width, pad_id)
        extras_bt = [pad([extra[i] for i in idx], num_rows, width, 0)[0] for extra in token_extras]
        out = forward(*(place_batch(x, mesh, rules) for x in (tokens_bt, mask_bt, *extras_bt)))
        out = processes.tree_to_host(out)  # every process gets every row
        for r, i in enumerate(idx):
            results[i] = jax.tree.map(lambda x: x[r], out)
        if on_batch is not None:
            on_batch(len(idx))
    return results
