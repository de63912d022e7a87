"""Between HF tensor names/layouts and our parameter pytree.

HF stores Linear weights as [out, in] under names such as
`model.layers.3.self_attn.q_proj.weight`; our params keep one stacked array per
kind with a leading `layers` axis (the scan layout) and kernels as [in, ...out].
Everything here is NumPy: conversion happens once, on the host.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cai_jax.models.config import TransformerConfig
from cai_jax.models.layer_layout import stack_layers, unstack_layers


def _t(w):
    return np.ascontiguousarray(np.asarray(w).T)


def _stack_layers(n_layers, layer_fn):
    """[n_layers, ...] from `layer_fn(i)`, filled in place, so that loading holds the
    result and one layer's temporaries, never a list of all layers beside it."""
    out = None
    for i in range(n_layers):
        w = np.asarray(layer_fn(i))
        if out is None:
            out = np.empty((n_layers,) + w.shape, w.dtype)
        out[i] = w
    return out


def _stack(tensors, name, n_layers, fn=lambda x: x):
    return _stack_layers(n_layers, lambda i: fn(tensors[name.format(i)]))


def fuse_qkv(q, k, v):
    """q [..., H, D], k and v [..., K, D] -> our fused [..., K, H/K + 2, D]: each key
    head's query heads, then its key, then its value (see models/transformer.py)."""
    q, k, v = (np.asarray(a) for a in (q, k, v))
    kv_heads = k.shape[-2]
    q = q.reshape(q.shape[:-2] + (kv_heads, q.shape[-2] // kv_heads, q.shape[-1]))
    return np.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


def split_qkv(qkv):
    """The inverse of fuse_qkv: [..., K, G + 2, D] -> q [..., K*G, D], k, v [..., K, D]."""
    qkv = np.asarray(qkv)
    g = qkv.shape[-2] - 2
    q = qkv[..., :g, :]
    return q.reshape(q.shape[:-3] + (-1, q.shape[-1])), qkv[..., g, :], qkv[..., g + 1, :]


def _require(tensors: Mapping[str, np.ndarray], names, source: str):
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def llama_from_hf(tensors: Mapping[str, np.ndarray], cfg: TransformerConfig, source="weights") -> dict:
    """HF Llama/Mistral/Qwen2 state dict -> our stacked params."""
    L, H, K, D, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    p = "model.layers.{}."
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + [
        (p + n).format(i) for i in range(L) for n in
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
         "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
    _require(tensors, needed, source)
    heads = {"q": H, "k": K, "v": K}

    def qkv(i, what, shape_fn):
        return fuse_qkv(*(shape_fn(tensors[(p + f"self_attn.{n}_proj.{what}").format(i)], heads[n])
                          for n in "qkv"))

    attn = {
        "qkv": {"kernel": _stack_layers(L, lambda i: qkv(i, "weight", lambda w, h: _t(w).reshape(d, h, D)))},
        "o": {"kernel": _stack(tensors, p + "self_attn.o_proj.weight", L, lambda w: _t(w).reshape(H, D, d))},
    }
    if cfg.qkv_bias:
        attn["qkv"]["bias"] = _stack_layers(
            L, lambda i: qkv(i, "bias", lambda b, h: np.asarray(b).reshape(h, D)))
    if cfg.out_bias:
        attn["o"]["bias"] = _stack(tensors, p + "self_attn.o_proj.bias", L)
    params = {
        "embed": np.asarray(tensors["model.embed_tokens.weight"]),
        "layers": {
            "attn": attn,
            "attn_norm": {"scale": _stack(tensors, p + "input_layernorm.weight", L)},
            "mlp_norm": {"scale": _stack(tensors, p + "post_attention_layernorm.weight", L)},
            "mlp": {"gate_up": {"kernel": _stack_layers(L, lambda i: np.stack(
                        [_t(tensors[(p + f"mlp.{n}_proj.weight").format(i)]) for n in ("gate", "up")], axis=1))},
                    "down": {"kernel": _stack(tensors, p + "mlp.down_proj.weight", L, _t)}},
        },
        "final_norm": {"scale": np.asarray(tensors["model.norm.weight"])},
    }
    if not cfg.tie_embeddings:
        _require(tensors, ["lm_head.weight"], source)
        # The largest tensor: a lazy GGUF reader transposes it chunk by chunk.
        head = getattr(tensors, "transposed", None)
        params["lm_head"] = {"kernel": head("lm_head.weight") if head else _t(tensors["lm_head.weight"])}
    return params


def llama_to_hf(params: Mapping, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    L, H, K, D, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    lay = params["layers"]
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    for i in range(L):
        p = f"model.layers.{i}."
        for n, w in zip("qkv", split_qkv(lay["attn"]["qkv"]["kernel"][i])):
            out[p + f"self_attn.{n}_proj.weight"] = _t(w.reshape(d, -1))
        out[p + "self_attn.o_proj.weight"] = _t(np.asarray(lay["attn"]["o"]["kernel"][i]).reshape(H * D, d))
        if cfg.qkv_bias:
            for n, b in zip("qkv", split_qkv(lay["attn"]["qkv"]["bias"][i])):
                out[p + f"self_attn.{n}_proj.bias"] = b.reshape(-1)
        if cfg.out_bias:
            out[p + "self_attn.o_proj.bias"] = np.asarray(lay["attn"]["o"]["bias"][i])
        gate_up = np.asarray(lay["mlp"]["gate_up"]["kernel"][i])
        out[p + "mlp.gate_proj.weight"] = _t(gate_up[:, 0])
        out[p + "mlp.up_proj.weight"] = _t(gate_up[:, 1])
        out[p + "mlp.down_proj.weight"] = _t(lay["mlp"]["down"]["kernel"][i])
        out[p + "input_layernorm.weight"] = np.asarray(lay["attn_norm"]["scale"][i])
        out[p + "post_attention_layernorm.weight"] = np.asarray(lay["mlp_norm"]["scale"][i])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _t(params["lm_head"]["kernel"])
    return out


def gpt2_from_hf(tensors: Mapping[str, np.ndarray], cfg: TransformerConfig, source="weights") -> dict:
    """HF GPT-2 state dict (with or without the `transformer.` prefix) -> our params."""
    if "wte.weight" in tensors:  # original OpenAI-converted checkpoints have no prefix
        tensors = {f"transformer.{k}": v for k, v in tensors.items()}
    L, H, D, d = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model
    p = "transformer.h.{}."
    _require(tensors, ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"]
             + [(p + "attn.c_attn.weight").format(i) for i in range(L)], source)

    def c_attn(what):  # Conv1D: [in, 3*out] with q, k, v side by side
        w = _stack(tensors, p + f"attn.c_attn.{what}", L)
        return fuse_qkv(*(part.reshape(part.shape[:-1] + (H, D)) for part in np.split(w, 3, axis=-1)))

    attn = {"qkv": {"kernel": c_attn("weight"), "bias": c_attn("bias")}}
    attn["o"] = {"kernel": _stack(tensors, p + "attn.c_proj.weight", L, lambda w: np.asarray(w).reshape(H, D, d)),
                 "bias": _stack(tensors, p + "attn.c_proj.bias", L)}
    return {
        "embed": np.asarray(tensors["transformer.wte.weight"]),
        "pos_embed": np.asarray(tensors["transformer.wpe.weight"]),
        "layers": {
            "attn": attn,
            "attn_norm": {"scale": _stack(tensors, p + "ln_1.weight", L), "bias": _stack(tensors, p + "ln_1.bias", L)},
            "mlp_norm": {"scale": _stack(tensors, p + "ln_2.weight", L), "bias": _stack(tensors, p + "ln_2.bias", L)},
            "mlp": {"up": {"kernel": _stack(tensors, p + "mlp.c_fc.weight", L), "bias": _stack(tensors, p + "mlp.c_fc.bias", L)},
                    "down": {"kernel": _stack(tensors, p + "mlp.c_proj.weight", L), "bias": _stack(tensors, p + "mlp.c_proj.bias", L)}},
        },
        "final_norm": {"scale": np.asarray(tensors["transformer.ln_f.weight"]),
                       "bias": np.asarray(tensors["transformer.ln_f.bias"])},
    }


def gpt2_to_hf(params: Mapping, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    L, d = cfg.num_layers, cfg.d_model
    lay = params["layers"]
    out = {"transformer.wte.weight": np.asarray(params["embed"]),
           "transformer.wpe.weight": np.asarray(params["pos_embed"]),
           "transformer.ln_f.weight": np.asarray(params["final_norm"]["scale"]),
           "transformer.ln_f.bias": np.asarray(params["final_norm"]["bias"])}
    for i in range(L):
        p = f"transformer.h.{i}."
        a = lay["attn"]
        out[p + "attn.c_attn.weight"] = np.concatenate(
            [w.reshape(d, -1) for w in split_qkv(a["qkv"]["kernel"][i])], -1)
        out[p + "attn.c_attn.bias"] = np.concatenate(
            [b.reshape(-1) for b in split_qkv(a["qkv"]["bias"][i])])
        out[p + "attn.c_proj.weight"] = np.asarray(a["o"]["kernel"][i]).reshape(-1, d)
        out[p + "attn.c_proj.bias"] = np.asarray(a["o"]["bias"][i])
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[p + f"{theirs}.weight"] = np.asarray(lay[ours]["scale"][i])
            out[p + f"{theirs}.bias"] = np.asarray(lay[ours]["bias"][i])
        out[p + "mlp.c_fc.weight"] = np.asarray(lay["mlp"]["up"]["kernel"][i])
        out[p + "mlp.c_fc.bias"] = np.asarray(lay["mlp"]["up"]["bias"][i])
        out[p + "mlp.c_proj.weight"] = np.asarray(lay["mlp"]["down"]["kernel"][i])
        out[p + "mlp.c_proj.bias"] = np.asarray(lay["mlp"]["down"]["bias"][i])
    return out


def from_hf(tensors, cfg: TransformerConfig, source="weights") -> dict:
    return (llama_from_hf if cfg.arch == "llama" else gpt2_from_hf)(tensors, cfg, source)


def to_hf(params, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    return (llama_to_hf if cfg.arch == "llama" else gpt2_to_hf)(params, cfg)


def to_model_layout(params: dict, cfg: TransformerConfig) -> dict:
    """Converters produce the scan layout; unstack when the model is unscanned."""
    return params if cfg.scan_layers else unstack_layers(params, cfg.num_layers)


def to_scan_layout(params: dict, cfg: TransformerConfig) -> dict:
    return params if "layers" in params else stack_layers(params, cfg.num_layers)
