"""Shuffled, batched, resumable training input with grain.

`make_dataset` takes any random-access source (a list, or a tfds
`as_data_source()` split) and a function that turns one example into a
pytree of numpy arrays, and returns a `grain.IterDataset` of batches:

    source -> this process's shard -> shuffle (new order every epoch)
           -> repeat -> map(to_arrays) -> batch

Iterate it with `iter(ds)`; the iterator's `get_state()` returns a small
JSON-serialisable dict, and `set_state(state)` on a fresh iterator from the
same arguments continues with exactly the batches the old one would have
produced next.

`split_heldout` sets a fixed, hashed slice of the examples aside for evaluation.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence

import grain

# Element -> pytree of numpy arrays (fixed shapes, so the default batching can stack them).
ToArrays = Callable[[Any], Any]


def process_shard() -> tuple[int, int]:
    """(shard index, shard count) for this JAX process, for multi-host input."""
    import jax  # imported here so that the loader itself does not need JAX

    return jax.process_index(), jax.process_count()


def shard_indices(num_examples: int, shard_index: int, shard_count: int,
                  drop_uneven: bool = True) -> range:
    """The example indices one shard reads (every shard_count-th one).

    With `drop_uneven`, the few examples past the last multiple of
    shard_count are left out, so every shard has the same number of examples
    and hosts stay in step (none waits for a batch another does not have).
    """
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"bad shard {shard_index} of {shard_count}")
    stop = num_examples - num_examples % shard_count if drop_uneven else num_examples
    return range(shard_index, stop, shard_count)


def make_dataset(source: Sequence[Any], to_arrays: ToArrays, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int = 0, shard_count: int = 1, drop_remainder: bool = True,
                 batch_fn: Callable[[Sequence[Any]], Any] | None = None,
                 num_threads: int = 0, prefetch_buffer_size: int = 16) -> grain.IterDataset:
    """Builds the batched input pipeline for one process.

    num_epochs=None repeats forever. `num_threads` > 0 runs `to_arrays` in
    that many threads (worth it for slow decoding; in-memory data is faster
    with 0). `batch_fn` replaces the default stacking, e.g. for padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    mine = shard_indices(len(source), shard_index, shard_count)
    # Shard before shuffling so that processes read disjoint examples.
    ds = grain.MapDataset.source(source).slice(slice(mine.start, mine.stop, mine.step))
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} has no examples "
                         f"(source has {len(source)})")
    if shuffle:
        # Shuffling a MapDataset permutes indices; each epoch gets a new order.
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(to_arrays)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)


def _hash_fraction(key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(examples: Sequence[dict], fraction: float, *, salt: str,
                  group: Optional[Callable[[str], str]] = None) -> tuple[list[dict], list[dict]]:
    """(train, held out), both in the given order: the examples whose "id" hashes
    lowest, `fraction` of them but at least one and never all (when there are two
    or more). Each stage salts the hash, so its held-out slice is unrelated to
    other stages' (and to the prompt sets' own train/test split).

    `group` maps an id to its group (e.g. the prompt a pair was made from):
    examples of one group are held out together, so nothing held out shares
    a prompt with training; `fraction` then counts groups."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    group = group or (lambda example_id: example_id)
    keys = sorted({group(e["id"]) for e in examples}, key=lambda k: _hash_fraction(k, salt))
    if len(keys) < 2:
        return list(examples), []
    count = min(max(1, round(fraction * len(keys))), len(keys) - 1)
    held = set(keys[:count])
    return ([e for e in examples if group(e["id"]) not in held],
            [e for e in examples if group(e["id"]) in held])
