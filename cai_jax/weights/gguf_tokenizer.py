"""A transformers fast tokenizer built from a GGUF file's `tokenizer.*` metadata.

transformers can do this itself (`AutoTokenizer.from_pretrained(..., gguf_file=...)`),
but its GGUF code imports torch, which the main install does not have. Here the
byte-level BPE described by the metadata is assembled directly with the
`tokenizers` library and wrapped as a `PreTrainedTokenizerFast`, giving the same
ids as transformers' GGUF tokenizer (the tests hold it to that).
"""
from __future__ import annotations

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SUPPORTED_MODELS = ("gpt2",)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _split_pattern(digits: str) -> str:
    """The tiktoken-style split used by Llama 3 and Qwen2; they differ only in digit runs."""
    return (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits
            + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _regex_split(digits: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_split_pattern(digits)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


# `tokenizer.ggml.pre` -> how text is cut into words before BPE.
# "smollm": llama.cpp (like SmolLM2's own tokenizer.json) first splits off every
# digit, then applies the GPT-2 split; transformers' GGUF loader, which the tests
# hold us to, applies only the GPT-2 split. That changes ids where two or more
# whitespace characters precede a digit ("a  5": "Ġ","Ġ","5" here, "ĠĠ","5" in
# llama.cpp; "\n\n1" likewise) and where a space precedes a non-ASCII digit.
PRE_TOKENIZERS = {
    "default": _gpt2_split,
    "gpt2": _gpt2_split,
    "gpt-2": _gpt2_split,
    "smollm": _gpt2_split,
    "qwen2": _regex_split(r"\p{N}"),
    "llama-bpe": _regex_split(r"\p{N}{1,3}"),
    "llama3": _regex_split(r"\p{N}{1,3}"),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (how byte-level vocabularies are spelled)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in spelled):
        spelled[b] = chr(256 + extra)
    return spelled


_BYTE_CHAR = _byte_alphabet()
_BYTE_CHARS = frozenset(_BYTE_CHAR.values())


def _is_byte_spelled(token: str) -> bool:
    return _BYTE_CHARS.issuperset(token)


def _byte_spelling(token: str) -> str:
    """A token as the byte-level vocabulary spells it; tokens already spelled that way are kept."""
    if _is_byte_spelled(token):
        return token
    return "".join(_BYTE_CHAR[b] for b in token.encode("utf-8"))


def read_metadata(path: str) -> tuple[dict, int]:
    """The `tokenizer.*` metadata of a GGUF file (keys without the `tokenizer.` prefix),
    and the offset where its tensor data starts: all metadata lies before it."""
    reader = gguf.GGUFReader(path)
    prefix = "tokenizer."
    meta = {key[len(prefix):]: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}
    return meta, int(reader.data_offset)


def _pre_tokenizer(path: str, meta: dict) -> pre_tokenizers.PreTokenizer:
    name = meta.get("ggml.pre", "default")
    if name not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: unsupported tokenizer.ggml.pre {name!r} "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    return PRE_TOKENIZERS[name]()


def _added_tokens(meta: dict) -> tuple[list[AddedToken], list[AddedToken]]:
    """Control tokens (special) and user-defined ones (plain), matched whole in the text.

    A token spelled outside the byte alphabet cannot be one of the vocabulary's own
    entries, so a control/user-defined label on it is a converter's mistake: skipped.
    """
    special, plain = [], []
    for token, kind in zip(meta["ggml.tokens"], meta.get("ggml.token_type") or ()):
        if kind in (_CONTROL, _USER_DEFINED) and _is_byte_spelled(token):
            bucket = special if kind == _CONTROL else plain
            bucket.append(AddedToken(token, normalized=False, special=kind == _CONTROL))
    return special, plain


def build_backend(path: str, meta: dict) -> Tokenizer:
    """The `tokenizers` byte-level BPE the metadata describes."""
    vocab = {_byte_spelling(token): i for i, token in enumerate(meta["ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta.get("ggml.merges") or ()]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   continuing_subword_prefix="", end_of_word_suffix=""))
    backend.pre_tokenizer = _pre_tokenizer(path, meta)
    backend.decoder = decoders.ByteLevel()
    special, plain = _added_tokens(meta)
    backend.add_special_tokens(special)
    backend.add_tokens(plain)
    return backend


def _special_token(meta: dict, name: str) -> str | None:
    token_id = meta.get(f"ggml.{name}_token_id")
    return None if token_id is None else meta["ggml.tokens"][token_id]


def tokenizer_from_metadata(path: str, meta: dict) -> PreTrainedTokenizerFast:
    """The tokenizer `meta` (from `read_metadata(path)`) describes; `path` names the file in errors."""
    model = meta.get("ggml.model")
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; only {', '.join(SUPPORTED_MODELS)} "
                         f"(byte-level BPE) can be built without transformers' torch-based GGUF loader")
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(path, meta),
        bos_token=_special_token(meta, "bos"),
        eos_token=_special_token(meta, "eos"),
        unk_token=_special_token(meta, "unknown"),
        pad_token=_special_token(meta, "padding"),
        add_bos_token=bool(meta.get("ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("ggml.add_eos_token", False)),
        chat_template=meta.get("chat_template"),
    )


def tokenizer_from_gguf_metadata(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, with its special tokens and chat template."""
    return tokenizer_from_metadata(path, read_metadata(path)[0])
