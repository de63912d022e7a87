"""Which prompts share a start, and the batches that compute each start once.

Host-side only (no JAX). The sampler (`sampling.py`) runs a batch's groups
in one program: every group's common prefix goes through the model once,
filling a KV cache row, and each prompt then runs only its own suffix,
reading its group's row. What repeats in this project's prompts:

- SL-CAI: the few-shot exemplars and instructions before every conversation;
- pairs by construction: one of a few system messages before every prompt;
- every chat-rendered prompt: the template's header (and default system message);
- feedback labels: the exemplars under one principle, or one conversation
  asked about in both orders.

Either the caller names the groups (`keys`, one per prompt) or `auto_keys`
finds them. A group's prefix is its members' longest common token prefix,
less at least one token, so that every suffix holds the last prompt token
(whose hidden state picks the first answer token).
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence

# A start shorter than this is not worth a group (a prefix row costs a little
# padding and bookkeeping of its own).
MIN_SHARED_PREFIX = 16


@dataclasses.dataclass
class Group:
    prefix: list[int]
    rows: list[int]  # indices into the prompts
    suffixes: list[list[int]]
    stored: bool = False  # the prefix's keys and values come from a KVStore, not a forward pass


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_groups(prompts: Sequence[Sequence[int]], keys: Sequence[Hashable]) -> list[Group]:
    """Prompts with the same key form a group (in order of first appearance);
    its prefix is their longest common token prefix, less at least one token.
    (Batches cut groups: `batches_of_groups`.)"""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    groups = []
    for rows in by_key.values():
        first = list(prompts[rows[0]])
        n = min(len(prompts[i]) for i in rows) - 1
        for i in rows[1:]:
            n = min(n, common_prefix_length(first, prompts[i]))
        n = max(n, 0)
        groups.append(Group(first[:n], rows, [list(prompts[i][n:]) for i in rows]))
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


def auto_keys(prompts: Sequence[Sequence[int]], min_prefix: int = MIN_SHARED_PREFIX) -> list[int]:
    """A group number per prompt, found from the tokens alone.

    In lexicographic order, prompts that share a start are neighbours. A
    group takes the next prompt while the tokens it saves do not fall: n
    members sharing P tokens save (n - 1) * P, and a newcomer that shortens
    the shared start to P' is taken when n * P' >= (n - 1) * P and
    P' >= min_prefix. A prompt that shares nothing is a group of its own.
    """
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    keys = [0] * len(prompts)
    group, first, shared, size = 0, None, 0, 0
    for i in order:
        if first is not None:
            new = min(shared, common_prefix_length(prompts[first], prompts[i]), len(prompts[i]) - 1)
            if new >= min_prefix and size * new >= (size - 1) * shared:
                keys[i], shared, size = group, new, size + 1
                continue
            group += 1
        keys[i], first, shared, size = group, i, len(prompts[i]) - 1, 1
    return keys


def batches_of_groups(prompts: Sequence[Sequence[int]], keys: Sequence[Hashable],
                      batch_size: int) -> list[list[Group]]:
    """Batches of `batch_size` prompts (the last may hold fewer), each as the
    groups it holds (rows index `prompts`). Groups go longest first (so a
    too-long batch fails, and the slowest shape compiles, before the others
    run) with their rows longest first (so a batch's suffixes pad little); a
    group cut by a batch boundary computes its prefix once in each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; must be >= 1")
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    members = [sorted(rows, key=lambda i: -len(prompts[i])) for rows in by_key.values()]
    members.sort(key=lambda rows: -len(prompts[rows[0]]))
    order = [i for rows in members for i in rows]
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        groups = split_groups([prompts[i] for i in idx], [keys[i] for i in idx])
        for g in groups:
            g.rows = [idx[r] for r in g.rows]
        batches.append(groups)
    return batches
