"""Tokenizers as transformers objects: built from GGUF metadata or read from a directory.

A GGUF's tokenizer is built by `gguf_tokenizer` without torch. Reading the
metadata with the `gguf` package takes ~2 s for SmolLM2 and ~6 s for Qwen2.5's
152k vocabulary, so the built tokenizer is also saved under the cache directory
(`$CAI_JAX_CACHE`, default ~/.cache/cai_jax), keyed by a hash of the file's
leading bytes, which hold all of its metadata; a rewritten file gets a new key.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile

from cai_jax.weights.cache import cache_dir

_KEYED_BYTES = 64 << 20  # the hashed prefix; files whose metadata runs past it are not cached
_CACHE_FORMAT = "1"  # bump when gguf_tokenizer builds differently, so old entries are not reused


def _metadata_digest(path: str) -> str:
    digest = hashlib.sha256(_CACHE_FORMAT.encode())
    with open(path, "rb") as f:
        digest.update(f.read(_KEYED_BYTES))
    return digest.hexdigest()[:32]


def _save(tok, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".saving-")
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic; if a concurrent builder won, both are equal
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=8)
def tokenizer_from_gguf(path: str):
    """The tokenizer in a GGUF file's metadata, with its chat template and special tokens."""
    from transformers import PreTrainedTokenizerFast

    from cai_jax.weights import gguf_tokenizer  # imports transformers: only when a tokenizer is wanted

    target = os.path.join(cache_dir(), "tokenizers", f"gguf-{_metadata_digest(path)}")
    if os.path.exists(os.path.join(target, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(target)
    meta, metadata_end = gguf_tokenizer.read_metadata(path)
    tok = gguf_tokenizer.tokenizer_from_metadata(path, meta)
    if metadata_end <= _KEYED_BYTES:
        _save(tok, target)
    return tok


@functools.lru_cache(maxsize=8)
def tokenizer_from_dir(directory: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    return AutoTokenizer.from_pretrained(directory)


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
