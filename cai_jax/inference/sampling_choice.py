"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Written for XLA:CPU, where the obvious primitives are slow on a 49k-token
vocabulary (measured per decode step at batch 32, in CPU time): a Gumbel-max
draw (`jax.random.categorical`, one random number per vocabulary entry) ~40 ms,
`lax.top_k` ~300 ms, `argmax` (a variadic reduce) several ms. Instead:

  - argmax is a max and then a min over the indices holding it;
  - a draw is one uniform number per row, located by inverse CDF in two levels
    (which 256-token block, then where in the block), so cumulative sums stay
    short;
  - top-k and top-p thresholds are found by bisection on the bit patterns of
    float32 values (whose integer order is their numeric order once negative
    values are flipped), 32 masked reductions each instead of a sort; exact,
    with ties kept together as in transformers.

Log-probs are always those of the unfiltered distribution at temperature 1.

Logits come vocabulary-major, [V, B] (one column per row of the batch): the
sampler's LM head is a weights-first product (see models/feature_major.py),
and transposing its output would make XLA fold the transpose back into a
slower batch-first product.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BLOCK = 256  # tokens per block of the two-level inverse CDF


@dataclasses.dataclass(frozen=True)
class Mode:
    """Which filters run: these change the compiled program, their values do not."""

    greedy: bool
    top_k: bool
    top_p: bool


def _order_key(x):
    """int32 keys with the same order as the float32 values (NaN aside)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _key_to_float(key):
    bits = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _smallest_false(lo, hi, answer_above):
    """Per row, the smallest int32 t in [lo, hi] with answer_above(t) false,
    given that it is true below that t and false from it on: 32 halvings cover
    any int32 range."""
    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        above = answer_above(mid)
        return jnp.where(above, mid + 1, lo), jnp.where(above, hi, mid)
    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return hi


def kth_largest(x_vb, k_b):
    """The k-th largest value of each column (k >= 1): [B]."""
    keys = _order_key(x_vb)
    lo, hi = jnp.min(keys, axis=0), jnp.max(keys, axis=0)
    k_b = jnp.broadcast_to(k_b, lo.shape)

    def answer_above(t):  # k or more values above t: the k-th largest is too
        return jnp.sum(keys > t[None, :], axis=0, dtype=jnp.int32) >= k_b
    return _key_to_float(_smallest_false(lo, hi, answer_above))


def top_p_threshold(probs_vb, top_p):
    """The smallest probability top-p keeps in each column: [B].

    A token is kept when the mass of the tokens strictly more likely than it is
    below top_p (transformers' rule, ties kept together). That mass only grows
    as the token's probability falls, so the kept set is {p >= t}, t being the
    smallest value whose mass above is below top_p.
    """
    keys = _order_key(probs_vb)
    lo = jnp.zeros(probs_vb.shape[1:], jnp.int32)
    hi = jnp.max(keys, axis=0)  # nothing lies above the maximum: mass 0 < top_p

    def answer_above(t):  # too much mass above t: the threshold is higher
        return jnp.sum(jnp.where(keys > t[None, :], probs_vb, 0.0), axis=0) >= top_p
    return _key_to_float(_smallest_false(lo, hi, answer_above))


def fast_argmax(x_vb):
    """First index of each column's maximum (two plain reductions)."""
    best = jnp.max(x_vb, axis=0, keepdims=True)
    index = jnp.arange(x_vb.shape[0], dtype=jnp.int32)[:, None]
    return jnp.min(jnp.where(x_vb == best, index, x_vb.shape[0]), axis=0)


def draw(keys_b, probs_vb):
    """One token per column from unnormalised probabilities by inverse CDF.

    Never returns a zero-probability token: at each level the index returned is
    the first whose running sum exceeds u, and a zero entry does not raise it;
    rounding at the top end falls back to the last entry with mass.
    """
    v, b = probs_vb.shape
    pad = (-v) % BLOCK
    blocks = jnp.pad(probs_vb, ((0, pad), (0, 0))).reshape(-1, BLOCK, b)  # [nb, BLOCK, B]
    block_mass = jnp.sum(blocks, axis=1)  # [nb, B]
    block_cdf = jnp.cumsum(block_mass, axis=0)
    u = jax.vmap(jax.random.uniform)(keys_b) * block_cdf[-1]  # [B]

    def first_above(cdf, mass, u):
        """Index of the first entry with cdf > u, or the last entry with mass."""
        index = jnp.arange(cdf.shape[0], dtype=jnp.int32)[:, None]
        count = jnp.sum(cdf <= u[None, :], axis=0, dtype=jnp.int32)
        last = jnp.max(jnp.where(mass > 0, index, 0), axis=0)
        return jnp.minimum(count, last)

    block = first_above(block_cdf, block_mass, u)
    in_block = jnp.take_along_axis(blocks, block[None, None, :], axis=0)[0]  # [BLOCK, B]
    before = jnp.take_along_axis(block_cdf - block_mass, block[None, :], axis=0)[0]
    inner = first_above(before[None, :] + jnp.cumsum(in_block, axis=0), in_block, u)
    return block * BLOCK + inner


def choose_tokens(logits_vb, keys_b, temperature, top_k, top_p, mode: Mode):
    """(tokens [B] int32, log p(token) [B]) from vocabulary-major logits [V, B],
    with p the model's distribution before temperature/top-k/top-p. Filters
    apply in transformers' order: temperature, then top-k, then top-p."""
    logits_vb = logits_vb.astype(jnp.float32)
    peak = jnp.max(logits_vb, axis=0, keepdims=True)
    log_norm = jnp.log(jnp.sum(jnp.exp(logits_vb - peak), axis=0)) + peak[0]
    if mode.greedy:
        tokens = fast_argmax(logits_vb)
    else:
        x = logits_vb / temperature
        if mode.top_k:
            x = jnp.where(x >= kth_largest(x, top_k)[None, :], x, -jnp.inf)
        probs = jnp.exp(x - jnp.max(x, axis=0, keepdims=True))
        if mode.top_p:
            probs = probs / jnp.sum(probs, axis=0, keepdims=True)
            probs = jnp.where(probs >= top_p_threshold(probs, top_p)[None, :], probs, 0.0)
        tokens = draw(keys_b, probs)
    chosen = jnp.take_along_axis(logits_vb, tokens[None, :], axis=0)[0]
    return tokens, chosen - log_norm
