"""Keys and values of one `generate` call's sequences, kept on the host for the
next calls whose prompts continue them.

SL-CAI asks for a critique, then for a revision whose prompt is the critique
prompt, the critique and the revision request; the next round's critique
prompt extends the revision prompt and the revision in the same way. Each
row's earlier sequence (prompt and sampled answer) is therefore a start of its
next prompt, and its keys and values are already computed. A `KVStore` passed
to `Sampler.generate` remembers, per example id, the tokens the model ran in
the latest call that held that example and their cache entries; in a later
call a prompt's longest common start with its example's sequence is read
from here instead of prefilled again (`Sampler._batches` chooses this where
it saves more than sharing prefixes within the call). An entry lives for
`keep_calls` calls: a prompt whose critique was dropped skips the revision
call, and its next critique prompt still continues its last critique prompt.

Layouts: the sampler's cache is per layer (lists of [B, H_kv, hd, S] keys and
[B, H_kv, S, hd] values) or stacked with a leading [L] axis (scanned layers).
Stored rows are per layer [H_kv, hd, n] keys and [H_kv, n, hd] values in
NumPy, whichever the layout.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import numpy as np

from cai_jax import processes

from cai_jax.inference.prefix_groups import common_prefix_length


class KVStore:
    """Per example: (tokens [n], keys per layer [H_kv, hd, n], values per layer
    [H_kv, n, hd]) of its latest sequence: prompt and answer, less the
    answer's last token (whose entries the decode loop never writes)."""

    def __init__(self, keep_calls: int = 2):
        if keep_calls < 1:
            raise ValueError(f"KVStore keep_calls is {keep_calls}; must be >= 1")
        self.keep_calls = keep_calls
        self._rows: dict = {}  # key -> (tokens, keys, values)
        self._call: dict = {}  # key -> the call that wrote it
        self._pending: dict = {}
        self._calls = 0

    def __len__(self) -> int:
        return len(self._rows)

    def reusable(self, key: Hashable, prompt: Sequence[int]) -> int:
        """How many of the prompt's first tokens the stored sequence covers,
        leaving at least the last one to run (its hidden state picks the first
        answer token)."""
        row = self._rows.get(key)
        if row is None:
            return 0
        return min(common_prefix_length(row[0], prompt), len(prompt) - 1)

    def prefix(self, key: Hashable, n: int) -> tuple[list, list]:
        _, keys, values = self._rows[key]
        return [k[..., :n] for k in keys], [v[:, :n] for v in values]

    def add(self, key: Hashable, tokens: np.ndarray, keys: list, values: list) -> None:
        self._pending[key] = (np.asarray(tokens, np.int32), keys, values)

    def end_call(self) -> None:
        """The sequences added during a call replace their examples' entries;
        entries no call wrote in the last `keep_calls` calls are dropped."""
        self._calls += 1
        for key, row in self._pending.items():
            self._rows[key], self._call[key] = row, self._calls
        self._pending = {}
        for key in [k for k, c in self._call.items() if c <= self._calls - self.keep_calls]:
            del self._rows[key], self._call[key]


def host_layers(cache, scanned: bool) -> tuple[list, list]:
    """The sampler's cache as NumPy per layer: ([B, H_kv, hd, S] keys, [B, H_kv, S, hd] values)."""
    if scanned:
        return list(processes.to_host(cache["k"])), list(processes.to_host(cache["v"]))
    return [processes.to_host(k) for k in cache["k"]], [processes.to_host(v) for v in cache["v"]]


def store_rows(store: KVStore, cache, scanned: bool, keys: Sequence[Hashable], prompts: Sequence,
               tokens_bn: np.ndarray, num_tokens_b: np.ndarray, key_mask_bs: np.ndarray,
               prompt_width: int) -> None:
    """Adds each row's sequence from a finished batch: the prompt's slots (the
    key mask's true ones before `prompt_width`) and the answer's slots after
    it, but the last answer token's."""
    layer_k, layer_v = host_layers(cache, scanned)
    for r, key in enumerate(keys):
        answered = max(int(num_tokens_b[r]) - 1, 0)
        slots = np.concatenate([np.flatnonzero(key_mask_bs[r, :prompt_width]),
                                prompt_width + np.arange(answered)])
        tokens = np.concatenate([np.asarray(prompts[r], np.int32), tokens_bn[r, :answered]])
        store.add(key, tokens, [k[r][..., slots] for k in layer_k], [v[r][:, slots] for v in layer_v])


def prefix_arrays(prefixes: Sequence[Optional[tuple[list, list]]], rows: int, width: int,
                  scanned: bool) -> dict:
    """Stored prefixes as the cache's first `width` slots for `rows` rows, each
    row's entries at the right end (as left-padded prompt tokens are); None
    or missing rows are empty. Per layer lists, or stacked when `scanned`."""
    some = next(p for p in prefixes if p is not None)
    num_layers = len(some[0])
    (kv, hd, _), dtype = some[0][0].shape, some[0][0].dtype
    k = np.zeros((num_layers, rows, kv, hd, width), dtype)
    v = np.zeros((num_layers, rows, kv, width, hd), dtype)
    for r, p in enumerate(prefixes):
        if p is None or p[0][0].shape[-1] == 0:
            continue
        n = p[0][0].shape[-1]
        k[:, r, ..., width - n:] = np.stack(p[0])
        v[:, r, :, width - n:] = np.stack(p[1])
    return {"k": k, "v": v} if scanned else {"k": list(k), "v": list(v)}
