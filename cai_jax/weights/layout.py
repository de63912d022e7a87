"""Between HF tensor names/layouts and our parameter pytree.

HF stores Linear weights as [out, in] under names such as
`model.layers.3.self_attn.q_proj.weight`; our params keep one stacked array per
kind with a leading `layers` axis (the scan layout) and kernels as [in, ...out].

Import builds each of our parameters as a view of HF's tensors (views.py), so
that a loader reads either the whole parameter or just one shard of it with the
same layout code; export works on whole NumPy arrays.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from cai_jax.models.config import TransformerConfig
from cai_jax.models.layer_layout import stack_layers, unstack_layers
from cai_jax.weights import views


def _t(w):
    return np.ascontiguousarray(np.asarray(w).T)


def _view(tensors, name: str) -> views.View:
    """One named tensor as a view: stores that read slices make their own
    (`tensors.view`); any other mapping holds arrays in memory."""
    if hasattr(tensors, "view"):
        return tensors.view(name)
    return views.from_array(tensors[name])


def _per_layer(n_layers: int, layer_view) -> views.View:
    """[n_layers, ...] from `layer_view(i)`: the scan layout's stacked axis."""
    return views.stacked([layer_view(i) for i in range(n_layers)])


def fused_qkv(q: views.View, k: views.View, v: views.View) -> views.View:
    """q [..., H, D], k and v [..., K, D] -> our fused [..., K, H/K + 2, D]: each key
    head's query heads, then its key, then its value (see models/transformer.py)."""
    kv_heads = k.shape[-2]
    q = views.SplitAxis(q, -2, (kv_heads, q.shape[-2] // kv_heads))
    return views.Joined([q, views.NewAxis(k, -2), views.NewAxis(v, -2)], axis=-2)


def split_qkv(qkv):
    """The inverse of fused_qkv, on arrays: [..., K, G + 2, D] -> q [..., K*G, D], k, v [..., K, D]."""
    qkv = np.asarray(qkv)
    g = qkv.shape[-2] - 2
    q = qkv[..., :g, :]
    return q.reshape(q.shape[:-3] + (-1, q.shape[-1])), qkv[..., g, :], qkv[..., g + 1, :]


def _require(tensors, names, source: str):
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def llama_from_hf(tensors, cfg: TransformerConfig, source="weights") -> dict:
    """HF Llama/Mistral/Qwen2 tensors -> our stacked params, as views (read nothing yet)."""
    L, H, K, D, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    p = "model.layers.{}."
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + [
        (p + n).format(i) for i in range(L) for n in
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
         "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
    _require(tensors, needed, source)
    heads = {"q": H, "k": K, "v": K}

    def layer(name):
        return lambda i: _view(tensors, (p + name).format(i))

    def kernel(name):  # HF Linear [out, in] -> our [in, out]
        return lambda i: views.Transposed(layer(name)(i))

    def qkv(what, per_head):
        return _per_layer(L, lambda i: fused_qkv(*(
            per_head(layer(f"self_attn.{n}_proj.{what}")(i), heads[n]) for n in "qkv")))

    attn = {
        # [out = heads * D, in = d] -> [d, heads, D]
        "qkv": {"kernel": qkv("weight", lambda w, h: views.SplitAxis(views.Transposed(w), 1, (h, D)))},
        "o": {"kernel": _per_layer(L, lambda i: views.SplitAxis(kernel("self_attn.o_proj.weight")(i), 0, (H, D)))},
    }
    if cfg.qkv_bias:
        attn["qkv"]["bias"] = qkv("bias", lambda b, h: views.SplitAxis(b, 0, (h, D)))
    if cfg.out_bias:
        attn["o"]["bias"] = _per_layer(L, layer("self_attn.o_proj.bias"))
    gate_up = lambda i: views.stacked([kernel(f"mlp.{n}_proj.weight")(i) for n in ("gate", "up")], axis=1)  # noqa: E731
    params = {
        "embed": _view(tensors, "model.embed_tokens.weight"),
        "layers": {
            "attn": attn,
            "attn_norm": {"scale": _per_layer(L, layer("input_layernorm.weight"))},
            "mlp_norm": {"scale": _per_layer(L, layer("post_attention_layernorm.weight"))},
            "mlp": {"gate_up": {"kernel": _per_layer(L, gate_up)},
                    "down": {"kernel": _per_layer(L, kernel("mlp.down_proj.weight"))}},
        },
        "final_norm": {"scale": _view(tensors, "model.norm.weight")},
    }
    if not cfg.tie_embeddings:
        _require(tensors, ["lm_head.weight"], source)
        # The largest tensor: a GGUF reader transposes it chunk by chunk, whole.
        head = getattr(tensors, "transposed", None)
        params["lm_head"] = {"kernel": views.Stored((d, cfg.vocab_size), lambda index: head("lm_head.weight")[index])
                             if head else views.Transposed(_view(tensors, "lm_head.weight"))}
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


def gpt2_from_hf(tensors, cfg: TransformerConfig, source="weights") -> dict:
    """HF GPT-2 tensors (with or without the `transformer.` prefix) -> our params, as views."""
    # Original OpenAI-converted checkpoints have no prefix.
    prefix = "" if "wte.weight" in tensors else "transformer."
    L, H, D, d = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model
    p = prefix + "h.{}."
    _require(tensors, [prefix + n for n in ("wte.weight", "wpe.weight", "ln_f.weight")]
             + [(p + "attn.c_attn.weight").format(i) for i in range(L)], source)

    def one(name):
        return _view(tensors, prefix + name)

    def stack(name):  # GPT-2's Conv1D already stores [in, out]: no transposes
        return _per_layer(L, lambda i: _view(tensors, (p + name).format(i)))

    def c_attn(what):  # [..., 3 * H * D] with q, k, v side by side
        w = stack(f"attn.c_attn.{what}")
        n = H * D
        return fused_qkv(*(views.SplitAxis(views.Interval(w, -1, j * n, (j + 1) * n), -1, (H, D))
                           for j in range(3)))

    attn = {"qkv": {"kernel": c_attn("weight"), "bias": c_attn("bias")},
            "o": {"kernel": views.SplitAxis(stack("attn.c_proj.weight"), 1, (H, D)),
                  "bias": stack("attn.c_proj.bias")}}
    return {
        "embed": one("wte.weight"),
        "pos_embed": one("wpe.weight"),
        "layers": {
            "attn": attn,
            "attn_norm": {"scale": stack("ln_1.weight"), "bias": stack("ln_1.bias")},
            "mlp_norm": {"scale": stack("ln_2.weight"), "bias": stack("ln_2.bias")},
            "mlp": {"up": {"kernel": stack("mlp.c_fc.weight"), "bias": stack("mlp.c_fc.bias")},
                    "down": {"kernel": stack("mlp.c_proj.weight"), "bias": stack("mlp.c_proj.bias")}},
        },
        "final_norm": {"scale": one("ln_f.weight"), "bias": one("ln_f.bias")},
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


def views_from_hf(tensors, cfg: TransformerConfig, source="weights") -> dict:
    """Our params (scan layout) as views of HF-named `tensors`: a store with
    `view(name)` (read slice by slice) or a mapping of arrays."""
    return (llama_from_hf if cfg.arch == "llama" else gpt2_from_hf)(tensors, cfg, source)


def from_hf(tensors, cfg: TransformerConfig, source="weights") -> dict:
    """Our params (scan layout) as host arrays: every view read whole, one at a time."""
    return jax.tree.map(lambda view: view.read_all(), views_from_hf(tensors, cfg, source))


def to_hf(params, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    return (llama_to_hf if cfg.arch == "llama" else gpt2_to_hf)(params, cfg)


def to_model_layout(params: dict, cfg: TransformerConfig) -> dict:
    """Converters produce the scan layout; unstack when the model is unscanned."""
    return params if cfg.scan_layers else unstack_layers(params, cfg.num_layers)


def to_scan_layout(params: dict, cfg: TransformerConfig) -> dict:
    return params if "layers" in params else stack_layers(params, cfg.num_layers)
