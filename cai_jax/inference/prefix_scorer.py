"""Option scoring that computes a shared prefix once (issue #16, item 3).

A feedback model's questions come in groups that share a long start: both
orders of a multiple-choice question share the exemplars, the conversation
and the principle; pointwise questions about one conversation share all but
the answer and what follows it. Here each group's common token prefix runs
through the model once, writing the KV cache, and only the differing
suffixes run after it, each reading its group's cache row (the cache is
gathered, i.e. broadcast, over the suffix batch). The option log-probs are
those of a full forward pass over prefix + suffix, up to float rounding.

One jitted program does both steps for a batch: G prefixes (left-padded to a
width bucket Wp) and B suffixes (left-padded to Ws) with a group index per
suffix. A suffix's padding sits between its prefix and its tokens, masked
out as keys, and its positions continue from its prefix's length, so the
model sees exactly the unpadded row.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.inference.batched_forward import batch_row_multiple, padded_width, place_batch
from cai_jax.inference.sampling_buckets import left_pad
from cai_jax.models.transformer import init_cache, positions_from_mask

# Suffixes are short (an answer and the cue): a smaller first width bucket
# than whole prompts get.
MIN_SUFFIX_WIDTH = 32


@dataclasses.dataclass
class Group:
    prefix: list[int]
    rows: list[int]  # indices into the prompts
    suffixes: list[list[int]]


def split_groups(prompts: Sequence[Sequence[int]], keys: Sequence[Hashable],
                 max_suffixes: Optional[int] = None) -> list[Group]:
    """Prompts with the same key form a group; its prefix is their longest
    common token prefix, less at least one token so that every suffix holds
    the answer position. Groups of more than `max_suffixes` rows are split
    (each part recomputes the prefix) so a group fits one batch."""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    groups = []
    for rows in by_key.values():
        first = list(prompts[rows[0]])
        n = min(len(prompts[i]) for i in rows) - 1
        for i in rows[1:]:
            row = prompts[i]
            k = 0
            while k < n and row[k] == first[k]:
                k += 1
            n = k
        n = max(n, 0)
        step = max_suffixes or len(rows)
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            groups.append(Group(first[:n], part, [list(prompts[i][n:]) for i in part]))
    return groups


def tokens_to_run(groups: Sequence[Group]) -> int:
    """Tokens the model runs for these groups (before padding)."""
    return sum(len(g.prefix) + sum(len(x) for x in g.suffixes) for g in groups)


def pick_keys(prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Hashable]]):
    """The grouping, among `candidates` (each one key per prompt), that leaves
    the fewest tokens to run: which one wins depends on the prompts (few-shot
    exemplars shared by every comparison under one principle, or a long
    conversation shared by all of one comparison's questions)."""
    return min(candidates, key=lambda keys: tokens_to_run(split_groups(prompts, keys)))


def pack_groups(groups: Sequence[Group], group_rows: int, suffix_rows: int) -> list[list[int]]:
    """Batches of group indices, longest prefixes first (so similar widths pad
    little), each with at most `group_rows` groups and `suffix_rows` suffixes."""
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g].prefix))
    batches, current, n_suffixes = [], [], 0
    for g in order:
        size = len(groups[g].suffixes)
        if current and (len(current) == group_rows or n_suffixes + size > suffix_rows):
            batches.append(current)
            current, n_suffixes = [], 0
        current.append(g)
        n_suffixes += size
    if current:
        batches.append(current)
    return batches


def make_prefix_forward(model, rules, head: Callable):
    """The jitted two-step forward: head(logits [B, V]) of each suffix's last token."""
    import flax.linen as nn

    def forward(params, prefix_gp, prefix_mask_gp, suffix_bs, suffix_mask_bs, group_b):
        wp = prefix_gp.shape[1]
        cache = init_cache(model.config, prefix_gp.shape[0], wp + suffix_bs.shape[1])
        with nn.logical_axis_rules(rules):
            _, cache = model.apply({"params": params}, prefix_gp, positions_from_mask(prefix_mask_gp),
                                   prefix_mask_gp, cache=cache, cache_index=0, last_only=True)
            cache = jax.tree.map(lambda c: jnp.take(c, group_b, axis=1), cache)  # [L, B, ...]
            prefix_len_b = prefix_mask_gp.sum(axis=-1)[group_b]
            positions_bs = prefix_len_b[:, None] + positions_from_mask(suffix_mask_bs)
            key_mask = jnp.concatenate([prefix_mask_gp[group_b], suffix_mask_bs], axis=-1)
            outputs, _ = model.apply({"params": params}, suffix_bs, positions_bs, key_mask, cache=cache,
                                     cache_index=wp, last_only=True)
        return head(outputs["logits"][:, -1].astype(jnp.float32))
    return jax.jit(forward)


def shared_prefix_forward(forward, prompts: Sequence[Sequence[int]], keys: Sequence[Hashable], *,
                          batch_size: int, min_width: int, max_width: Optional[int] = None,
                          pad_id: int = 0, mesh=None, on_batch=None) -> list:
    """forward(prefix_gp, prefix_mask, suffix_bs, suffix_mask, group_b) (from
    make_prefix_forward, parameters bound) over `prompts` grouped by `keys`:
    one output row per prompt, in input order.

    Each batch holds `batch_size` suffix rows and as many groups as the
    typical group size leaves room for, so few prefix rows are filler.
    """
    multiple = batch_row_multiple(mesh)
    suffix_rows = -(-max(1, batch_size) // multiple) * multiple
    groups = split_groups(prompts, keys, max_suffixes=suffix_rows)
    typical = int(np.median([len(g.suffixes) for g in groups])) if groups else 1
    group_rows = -(-max(1, suffix_rows // max(1, typical)) // multiple) * multiple
    results: list = [None] * len(prompts)
    for batch in pack_groups(groups, group_rows, suffix_rows):
        chosen = [groups[g] for g in batch]
        # An empty prefix still needs one real (pad) token to write and attend to.
        prefixes = [g.prefix or [pad_id] for g in chosen]
        empty = [not g.prefix for g in chosen]
        wp = padded_width(max(len(p) for p in prefixes), min_width, max_width)
        prefix_gp, prefix_mask = left_pad(prefixes + [[pad_id]] * (group_rows - len(chosen)), group_rows, wp,
                                          pad_id)
        for r, is_empty in enumerate(empty):
            prefix_mask[r] &= not is_empty  # the stand-in token is not part of the prompt
        suffixes, group_b, rows = [], [], []
        for gi, g in enumerate(chosen):
            suffixes += g.suffixes
            group_b += [gi] * len(g.suffixes)
            rows += g.rows
        ws = padded_width(max(len(s) for s in suffixes), MIN_SUFFIX_WIDTH, max_width)
        fillers = suffix_rows - len(suffixes)
        suffix_bs, suffix_mask = left_pad(suffixes + [[pad_id]] * fillers, suffix_rows, ws, pad_id)
        group_b = np.asarray(group_b + [0] * fillers, np.int32)
        out = forward(*(place_batch(x, mesh) for x in (prefix_gp, prefix_mask, suffix_bs, suffix_mask)),
                      jnp.asarray(group_b))
        out = jax.tree.map(np.asarray, out)
        for r, i in enumerate(rows):
            results[i] = jax.tree.map(lambda x: x[r], out)
        if on_batch is not None:
            on_batch(len(rows))
    return results
