"""Tokenizers: built from GGUF metadata or read from a directory.

A GGUF's tokenizer is built by `gguf_tokenizer` without torch. Reading the
metadata with the `gguf` package takes ~2 s for SmolLM2 and ~6 s for Qwen2.5's
152k vocabulary, so the built tokenizer is also saved under the cache directory
(`$CAI_JAX_CACHE`, default ~/.cache/cai_jax), keyed like the converted weights
by the file's path, size and modification time: a rewritten file gets a new
key. (Hashing the file's leading 64 MB instead took 0.14 s of every start-up.)

Folders that `saved_tokenizer` reproduces exactly (the ones cai_jax writes)
are read by it without importing transformers; any other goes to transformers.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

from cai_jax import storage
from cai_jax.weights import saved_tokenizer
from cai_jax.weights.cache import cache_dir, file_stamp

_CACHE_FORMAT = "2"  # bump when gguf_tokenizer builds differently, so old entries are not reused


def _source_digest(path: str) -> str:
    stamp = file_stamp(path)
    key = [_CACHE_FORMAT, stamp["source"], stamp["size"], stamp["mtime_ns"]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def _save(tok, target: str) -> None:
    with storage.local_directory_built(target, keep_existing=True) as tmp:  # a concurrent builder's is equal
        tok.save_pretrained(tmp)


@functools.lru_cache(maxsize=8)
def tokenizer_from_gguf(path: str):
    """The tokenizer in a GGUF file's metadata, with its chat template and special tokens."""
    target = os.path.join(cache_dir(), "tokenizers", f"gguf-{_source_digest(path)}")
    if not os.path.exists(os.path.join(target, "tokenizer.json")):
        from cai_jax.weights import gguf_tokenizer  # imports transformers: only to build one

        built = gguf_tokenizer.tokenizer_from_gguf_metadata(path)
        try:
            _save(built, target)
        except OSError:
            return built  # the cache folder cannot be written: use the built one as it is
    return _from_saved(target)


def _from_saved(directory: str):
    if saved_tokenizer.readable(directory):
        return saved_tokenizer.SavedTokenizer(directory)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@functools.lru_cache(maxsize=8)
def tokenizer_from_dir(directory: str):
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    return _from_saved(directory)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without adding special tokens.

    Rendered text already holds the chat template's special tokens; adding a
    BOS would make training text differ from what sampling sees.
    """
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, 0 when it has none (or there is no tokenizer):
    padded positions are masked out, so any valid id will do."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end an answer: EOS and, for chat models, the end-of-turn token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return tuple(sorted(ids))
