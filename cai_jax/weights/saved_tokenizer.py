"""A saved tokenizer folder read with the `tokenizers` library and jinja2 alone.

Importing transformers and building its tokenizer takes about 0.9 s of every
process here, more than a second run of `cai_jax.tools.generate` spends on
anything but its first token (issue #20). The folders cai_jax writes (a GGUF's
tokenizer, saved under the cache directory and beside checkpoints) hold a
complete `tokenizer.json`, so a few dozen lines cover the calls the project
makes: encoding, decoding, special tokens and the chat template. Everything
here is held to transformers' own tokenizer on the same folder by
tests/test_saved_tokenizer.py; `readable(directory)` says whether a folder is
one of these, and other folders go to transformers.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
from typing import Any, Optional, Sequence

from tokenizers import Tokenizer

CONFIG_FILE, BACKEND_FILE, TEMPLATE_FILE = "tokenizer_config.json", "tokenizer.json", "chat_template.jinja"
# tokenizer_class values of folders whose behaviour is all in tokenizer.json.
_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_config(directory: str) -> dict:
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def readable(directory: str) -> bool:
    """True when `directory` is a folder this class reproduces exactly: a plain
    fast tokenizer whose config asks for nothing beyond tokenizer.json."""
    if not os.path.exists(os.path.join(directory, BACKEND_FILE)):
        return False
    try:
        config = _read_config(directory)
    except (OSError, ValueError):
        return False
    return (config.get("tokenizer_class") in _PLAIN_CLASSES
            and not config.get("clean_up_tokenization_spaces", False)
            and not config.get("add_bos_token", False) and not config.get("add_eos_token", False)
            and not config.get("extra_special_tokens") and not config.get("additional_special_tokens"))


def _token_text(value: Any) -> Optional[str]:
    """A special token as the config stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str):
    # The same rendering rules transformers applies to chat templates: a
    # sandbox, blocks trimmed, loop controls, JSON without HTML escaping, and
    # the two helpers templates call.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class SavedTokenizer:
    """The tokenizer in `directory` (tokenizer.json, tokenizer_config.json and
    an optional chat_template.jinja), with the subset of transformers' API
    that cai_jax calls."""

    def __init__(self, directory: str):
        if not readable(directory):
            raise ValueError(f"{directory}: not a plain tokenizer folder (see saved_tokenizer.readable)")
        self.directory = directory
        config = _read_config(directory)
        self.backend = Tokenizer.from_file(os.path.join(directory, BACKEND_FILE))
        template_path = os.path.join(directory, TEMPLATE_FILE)
        if os.path.exists(template_path):
            with open(template_path, encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            self.chat_template = config.get("chat_template")
        self.padding_side = config.get("padding_side", "right")  # transformers' default
        self._special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
        for name, text in self._special.items():
            setattr(self, name, text)
            setattr(self, name + "_id", None if text is None else self.backend.token_to_id(text))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: text for name, text in self._special.items() if text is not None}

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"SavedTokenizer encodes one string at a time, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def convert_tokens_to_ids(self, tokens):
        """An id per token; a token not in the vocabulary gives the unknown token's id."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = True,
                            add_generation_prompt: bool = False, return_dict: bool = True,
                            **template_vars):
        """The conversation rendered with the chat template: its text, or when
        `tokenize` its ids (as {"input_ids", "attention_mask"} with
        `return_dict`, as transformers gives them). Extra keyword arguments are
        template variables."""
        if not self.chat_template:
            raise ValueError(f"{self.directory}: this tokenizer has no chat template")
        if not messages:
            raise ValueError("apply_chat_template: the conversation is empty")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compiled_template(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_vars})
        if not tokenize:
            return text
        return self(text, add_special_tokens=False) if return_dict else self.encode(text, add_special_tokens=False)

    def save_pretrained(self, directory: str) -> tuple[str, ...]:
        """Copies the folder's files, so transformers and this class both read the copy."""
        os.makedirs(directory, exist_ok=True)
        written = []
        for name in (CONFIG_FILE, BACKEND_FILE, TEMPLATE_FILE):
            source = os.path.join(self.directory, name)
            if os.path.exists(source):
                shutil.copyfile(source, os.path.join(directory, name))
                written.append(os.path.join(directory, name))
        return tuple(written)
