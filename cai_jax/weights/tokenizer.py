"""Tokenizers as transformers objects: built from GGUF metadata or read from a directory.

Building the BPE tokenizer from GGUF metadata takes ~10 s, so the result is saved
once under the cache directory (`$CAI_JAX_CACHE`, default ~/.cache/cai_jax) keyed
by the file's name, size and mtime, and reloaded from there afterwards.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile


def cache_dir() -> str:
    return os.environ.get("CAI_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cai_jax"))


def _gguf_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def tokenizer_from_gguf(path: str):
    """The tokenizer in a GGUF file's metadata, with its chat template and special tokens."""
    from transformers import AutoTokenizer

    target = os.path.join(cache_dir(), "tokenizers", f"{os.path.basename(path)}-{_gguf_key(path)}")
    if os.path.exists(os.path.join(target, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(target)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target))
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent builder may have won; both are equal
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
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
