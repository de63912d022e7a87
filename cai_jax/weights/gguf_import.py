"""Reading GGUF files (llama.cpp's format): config and dequantized tensors.

The real models we run ship as GGUF files inside PyPI packages (see packaged.py).
Tensors are dequantized one at a time, when the layout code asks for them, so
loading never holds the whole model twice.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cai_jax.errors import NotModelledError
from cai_jax.models.config import RopeScaling, TransformerConfig
from cai_jax.weights import views

# llama.cpp's converter interleaves the rotary halves of the Q and K rows for the
# llama architecture only (Mistral models are converted as llama too); qwen2
# files keep HF's [first half | second half] layout.
SUPPORTED_ARCHS = {"llama": True, "qwen2": False}  # arch -> Q/K rows were permuted


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _rope_scaling(get, names, path: str) -> RopeScaling | None:
    """The file's RoPE scaling: none, or linear; anything else is refused with
    NotModelledError (the weights would run with the wrong rotary frequencies).
    llama.cpp stores Llama 3.1's llama3 scaling as a tensor of per-frequency
    divisors (rope_freqs), which we do not read."""
    kind = get("rope.scaling.type", "none")
    if "rope_freqs.weight" in names:
        raise NotModelledError(f"{path}: per-frequency RoPE divisors (tensor rope_freqs, e.g. Llama 3.1's llama3 "
                               "rope scaling) are not modelled for GGUF; load the model's HF safetensors (hf:DIR)")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor")))
    raise NotModelledError(f"{path}: rope scaling {kind!r} is not modelled (only linear); "
                           "cai_jax cannot run these weights")


def config_from_gguf(reader, path: str = "GGUF file") -> TransformerConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported ({', '.join(SUPPORTED_ARCHS)})")
    get = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    d_model = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = int(get("attention.key_length", d_model // heads))
    window, context = get("attention.sliding_window"), int(get("context_length", 2048))
    if window is not None and int(window) < context:
        raise NotModelledError(f"{path}: sliding-window attention (window {window}) is not modelled; "
                               "cai_jax cannot run these weights")
    rotated = int(get("rope.dimension_count", head_dim))
    if rotated != head_dim:
        raise NotModelledError(f"{path}: RoPE on {rotated} of each head's {head_dim} dimensions (partial rotary) "
                               "is not modelled; cai_jax cannot run these weights")
    return TransformerConfig(
        arch="llama", vocab_size=int(vocab), d_model=d_model,
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        mlp_dim=int(get("feed_forward_length")),
        max_seq_len=context,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get, names, path),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
    )


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp interleaves the rotary halves of Q/K rows; HF keeps them as
    # [first half | second half] per head. Undo the interleave.
    out_dim, d = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, d).swapaxes(1, 2).reshape(out_dim, d)


_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TO_HF = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TO_HF:
        return _GLOBAL_TO_HF[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, kind, what = gguf_name.split(".")
        if kind in _GGUF_TO_HF:
            return f"model.layers.{idx}.{_GGUF_TO_HF[kind]}.{what}"
    return None  # e.g. precomputed rope frequencies: derived, not learned


_ROWS_PER_CHUNK = 4096  # keeps dequantization temporaries to a few tens of MB


def _dequantize(path: str, t, transpose: bool = False) -> np.ndarray:
    """One tensor as float32 (a 2-D one transposed on request), read with plain
    file reads in row chunks.

    Reading through the reader's memory map would leave the whole file resident
    in this process once every tensor has been touched; chunks keep the
    temporaries of gguf.dequantize small, and transposing chunk by chunk avoids
    a second full copy of the largest tensor (the output head).
    """
    import gguf

    stored = t.data  # a lazy memmap view: only its shape and dtype are used here
    rows = stored.reshape(-1, stored.shape[-1]) if stored.ndim > 1 else stored.reshape(1, -1)
    row_bytes = rows.shape[1] * rows.dtype.itemsize
    out = None
    with open(path, "rb") as f:
        for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
            n = min(_ROWS_PER_CHUNK, rows.shape[0] - start)
            f.seek(t.data_offset + start * row_bytes)
            raw = np.frombuffer(f.read(n * row_bytes), dtype=rows.dtype).reshape(n, rows.shape[1])
            chunk = gguf.dequantize(raw, t.tensor_type)
            if transpose:
                if out is None:
                    out = np.empty((chunk.shape[1], rows.shape[0]), np.float32)
                out[:, start:start + n] = chunk.T
                continue
            if out is None:
                out = np.empty((rows.shape[0], chunk.shape[1]), np.float32)
            out[start:start + n] = chunk
    if transpose:
        return out
    return out.reshape(stored.shape[:-1] + (out.shape[1],)) if stored.ndim > 1 else out.reshape(-1)


class DequantizedTensors(Mapping):
    """HF-named float32 tensors of a GGUF file, dequantized when read (not kept)."""

    def __init__(self, path: str, reader, cfg: TransformerConfig, arch: str):
        self._tensors = {hf: t for t in reader.tensors if (hf := _hf_name(t.name)) is not None}
        self._path, self._cfg, self._permuted = path, cfg, SUPPORTED_ARCHS[arch]

    def __getitem__(self, name: str) -> np.ndarray:
        w = _dequantize(self._path, self._tensors[name])
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            n = self._cfg.num_heads if ".q_proj." in name else self._cfg.num_kv_heads
            w = _unpermute_rope_rows(w, n) if w.ndim == 2 else _unpermute_rope_rows(w[:, None], n)[:, 0]
        return w

    def view(self, name: str) -> views.View:
        """`name` as a view for the layout code (weights/layout.py): dequantized
        whole when read, since GGUF's quantized blocks do not slice."""
        shape = tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists dims innermost first
        return views.Stored(shape, lambda index: self[name][index])

    def transposed(self, name: str) -> np.ndarray:
        """`self[name].T`, contiguous, without holding both (for an unpermuted 2-D tensor)."""
        assert ".q_proj." not in name and ".k_proj." not in name
        return _dequantize(self._path, self._tensors[name], transpose=True)

    def __contains__(self, name) -> bool:  # Mapping's default would dequantize to find out
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)


def read_gguf(path: str) -> tuple[TransformerConfig, DequantizedTensors]:
    """Config and HF-named tensors (dequantized lazily) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    cfg = config_from_gguf(reader, path)
    return cfg, DequantizedTensors(path, reader, cfg, _field(reader, "general.architecture"))
