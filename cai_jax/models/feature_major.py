"""The sampler's forward pass on one device: the Transformer's math with the
activations feature-major ([D, tokens]) and every kernel stored [out, in].

Why: XLA:CPU runs a product of a weight matrix and a few activation rows much
faster with the weights as the left operand. On the 2-core dev machine with
SmolLM2's shapes (`benchmarks/bench_orientation.py`), a 30-layer MLP chain
took 0.80-0.82 of the time at 8 and 32 rows and the LM head 0.72-0.75 (0.99
and 1.13 at one row, hence the batch-1 head in `logits_vb`). Only the
orientation of the product's output matters: XLA folds a transpose of the
output back into the product, which is why the activations stay [D, tokens]
from the embedding to the head and the logits come out [V, B]
(`sampling_choice` takes them so).

The math is `transformer.py`'s, sharing its attention (`write_cache`,
`attend`) and norm (`normalize`); the tests check the sampler against the Flax
model token for token. The sampler runs it as its `feature_major` trunk
(`inference/trunks/feature_major.py`); sharded sampling runs the Flax model
(`inference/trunks/flax_model.py`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cai_jax.models import matmul
from cai_jax.models.config import TransformerConfig
from cai_jax.models.rope import rope
from cai_jax.models.transformer import attend, normalize, write_cache
from cai_jax.models.layer_layout import unstack_layers


def _kernel_t(kernel, n_in_axes: int = 1):
    """A Flax kernel [in..., out...] as a matrix [out, in]."""
    return kernel.reshape(math.prod(kernel.shape[:n_in_axes]), -1).T


def _dense_t(cfg: TransformerConfig, dense: dict, n_in_axes: int = 1) -> dict:
    out = {"kernel_t": matmul.stored_operand(_kernel_t(dense["kernel"], n_in_axes), cfg.matmul_dtype)}
    if "bias" in dense:
        out["bias"] = dense["bias"].reshape(-1)
    return out


def _layer(cfg: TransformerConfig, p: dict) -> dict:
    mlp = p["mlp"]
    layer = {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"],
             "qkv": _dense_t(cfg, p["attn"]["qkv"]), "o": _dense_t(cfg, p["attn"]["o"], n_in_axes=2),
             "down": _dense_t(cfg, mlp["down"])}
    if cfg.arch == "llama":
        layer["gate_up"] = _dense_t(cfg, mlp["gate_up"])  # [2 * mlp, D]: gate rows, then up rows
    else:
        layer["up"] = _dense_t(cfg, mlp["up"])
    return layer


def transposed_layers(cfg: TransformerConfig, params: dict) -> list:
    """The per-layer parameters as `forward` takes them, from the model's own
    (scanned `layers` or unrolled `layers_i`): kernels transposed to [out, in],
    biases flat. Meant to run under `jax.jit`, so each kernel is copied once."""
    if "layers" in params:
        params = unstack_layers(params, cfg.num_layers)
    return [_layer(cfg, params[f"layers_{i}"]) for i in range(cfg.num_layers)]


def _project(cfg: TransformerConfig, dense: dict, x_in_n):
    """[out, in] @ [in, N] (+ bias): the weights-first product, in compute dtype."""
    y = matmul.einsum("oi,in->on", _compute(cfg, dense["kernel_t"]), x_in_n.astype(cfg.compute_dtype),
                      cfg.matmul_dtype, out_dtype=cfg.compute_dtype)
    if "bias" in dense:
        y = y + dense["bias"].astype(cfg.compute_dtype)[:, None]
    return y


def _compute(cfg: TransformerConfig, w):
    return matmul.read_operand(w, cfg.matmul_dtype, cfg.compute_dtype)


def _norm(cfg: TransformerConfig, p: dict, x_dn):
    return normalize(x_dn, p["scale"], p.get("bias"), cfg, axis=0)


def forward(cfg: TransformerConfig, params: dict, tokens_bt, positions_bt, key_mask_bs, cache=None,
            cache_index=0, last_only: bool = False):
    """The Transformer's trunk over new tokens, optionally with a per-layer KV
    cache (lists of [B, H_kv, hd, S] keys and [B, H_kv, S, hd] values, as the
    sampler keeps them). Returns (final normed hidden states [D, B*T], or
    [D, B] with `last_only`; the updated cache or None).

    `params`: "embed" [V, D], "final_norm", "pos_embed" (gpt2) as the model
    has them, and "layers" from `transposed_layers`."""
    b, t = tokens_bt.shape
    n = b * t
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = h // kv
    x = jnp.take(params["embed"], tokens_bt.reshape(n), axis=0).astype(cfg.compute_dtype)
    if cfg.arch == "gpt2":
        x = x + jnp.take(params["pos_embed"], positions_bt.reshape(n), axis=0).astype(cfg.compute_dtype)
    x = x.T  # [D, N], token n = (row n // T, position n % T)
    new_k, new_v = [], []
    for i, p in enumerate(params["layers"]):
        qkv = _project(cfg, p["qkv"], _norm(cfg, p["attn_norm"], x)).reshape(kv, g + 2, hd, b, t)
        q = qkv[:, :g].transpose(3, 4, 0, 1, 2).reshape(b, t, h, hd)
        k = qkv[:, g].transpose(2, 3, 0, 1)  # [B, T, H_kv, hd]
        v = qkv[:, g + 1].transpose(2, 3, 0, 1)
        if cfg.arch == "llama":
            q = rope(q, positions_bt, cfg)
            k = rope(k, positions_bt, cfg)
        layer_cache, k_read, v_read, key_mask = write_cache(
            None if cache is None else (cache["k"][i], cache["v"][i]),
            k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), key_mask_bs, cache_index)
        if cache is not None:
            new_k.append(layer_cache[0])
            new_v.append(layer_cache[1])
        out = attend(q, k_read, v_read, key_mask, cache_index, cfg.compute_dtype,
                     cfg.matmul_dtype)  # [B, T, H, hd]
        x = x + _project(cfg, p["o"], out.reshape(n, h * hd).T)
        normed = _norm(cfg, p["mlp_norm"], x)
        if cfg.arch == "llama":
            gate_up = _project(cfg, p["gate_up"], normed).reshape(2, cfg.mlp_dim, n)
            hidden = jax.nn.silu(gate_up[0]) * gate_up[1]
        else:
            hidden = jax.nn.gelu(_project(cfg, p["up"], normed), approximate=True)  # GPT-2's "gelu_new"
        x = x + _project(cfg, p["down"], hidden)
    x = _norm(cfg, params["final_norm"], x)
    if last_only:
        x = x.reshape(cfg.d_model, b, t)[:, :, -1]
    return x, (None if cache is None else {"k": new_k, "v": new_v})


def logits_vb(cfg: TransformerConfig, head_vd, head_dv, hidden_dn):
    """The LM head on feature-major hidden states: [V, N] float32 logits, from
    the head as [V, D] and as [D, V] (the tied embedding and its transpose,
    or the untied kernel transposed and as it is).

    A single column takes the activation-first product with the [D, V] head:
    with one row that one measured faster (SmolLM2's head: 3.4 against 3.9 ms,
    `benchmarks/bench_orientation.py`)."""
    if hidden_dn.shape[1] == 1:
        row = matmul.einsum("nd,dv->nv", hidden_dn.reshape(1, -1), _compute(cfg, head_dv), cfg.matmul_dtype)
        return row.reshape(-1, 1)
    return matmul.einsum("vd,dn->vn", _compute(cfg, head_vd), hidden_dn, cfg.matmul_dtype)
