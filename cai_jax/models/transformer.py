"""A decoder-only transformer in Flax Linen: the Llama family and GPT-2.

One module covers both families (see `TransformerConfig.arch`). It is purely
functional: parameters come in as a pytree, and the optional KV cache is an
explicit input and output rather than a mutable Flax collection, so that the
sampler can donate it and every stage sees the same call:

    outputs, new_cache = model.apply({"params": params}, tokens_bt, positions_bt,
                                     key_mask_bs, cache=cache, cache_index=i)

Without a cache the keys are the tokens themselves (S == T). With a cache of
length S the new keys/values are written at slots [cache_index, cache_index + T)
and every query attends to the slots at or before its own whose `key_mask_bs`
entry is true, which handles left padding and decoding alike.

Every parameter carries logical axis names (embed, mlp, heads, kv_heads,
head_dim, vocab, layers) that `cai_jax.sharding` maps onto the mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax.models import matmul
from cai_jax.models.config import TransformerConfig
from cai_jax.models.rope import rope

KVCache = dict  # {"k": [L, B, H_kv, D, S], "v": [L, B, H_kv, S, D]}, see cache_shapes

_NEG_INF = -1e30


def cache_shapes(config: TransformerConfig, batch: int, length: int) -> dict:
    """Per-layer cache shapes: keys [B, H_kv, D, S], values [B, H_kv, S, D].

    Keys with the sequence axis last make the score product a plain
    [queries, D] x [D, S] matmul and values [S, D] make the output one too;
    decode attention on XLA:CPU at batch 16 and 1k cached tokens took 60 ms a
    step this way against 231 ms with keys [S, D] (docs/sampler-performance.md).
    """
    kv, d = config.num_kv_heads, config.head_dim
    return {"k": (batch, kv, d, length), "v": (batch, kv, length, d)}


def init_cache(config: TransformerConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty KV cache, every layer stacked on a leading [L] axis."""
    dtype = dtype or config.compute_dtype
    return {name: jnp.zeros((config.num_layers,) + shape, dtype)
            for name, shape in cache_shapes(config, batch, length).items()}


def _param_init(names, init=nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, names)


class Norm(nn.Module):
    """RMSNorm (llama) or LayerNorm (gpt2), computed in float32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", _param_init(("embed",), nn.initializers.ones),
                           (cfg.d_model,), cfg.weight_dtype)
        bias = None
        if cfg.arch == "gpt2":
            bias = self.param("bias", _param_init(("embed",), nn.initializers.zeros),
                              (cfg.d_model,), cfg.weight_dtype)
        return normalize(x, scale, bias, cfg)


def normalize(x, scale, bias, cfg: TransformerConfig, axis: int = -1):
    """The Norm module's math over the feature `axis`; `scale` and `bias` [D]
    broadcast along it."""
    x32 = x.astype(jnp.float32)
    shape = [1] * x.ndim
    shape[axis] = cfg.d_model
    scale = scale.astype(jnp.float32).reshape(shape)
    if cfg.arch == "llama":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis, keepdims=True) + cfg.norm_eps)
        return (y * scale).astype(cfg.compute_dtype)
    mean = jnp.mean(x32, axis, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return (y * scale + bias.astype(jnp.float32).reshape(shape)).astype(cfg.compute_dtype)


def _dense(features, names, cfg, use_bias, axis=-1, name=None):
    """DenseGeneral whose kernel/bias carry logical axis names (bias: output axes)."""
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=use_bias, dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype, kernel_init=_param_init(names),
        bias_init=_param_init(names[-n_out:], nn.initializers.zeros), name=name,
        dot_general=matmul.dot_general(cfg.matmul_dtype))


class Attention(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, key_mask_bs, cache_index, layer_cache):
        cfg = self.config
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        b, t = x_btd.shape[:2]
        g = h // kv
        # One fused projection: for each key head, its g query heads, then its key
        # and its value ([D, kv, g + 2, hd], see weights/layout.py). A single wide
        # matmul beats three narrow ones at decode batch sizes on XLA:CPU (SmolLM2
        # batch-1 decode step 26.1 -> 18.7 ms; docs/sampler-performance.md).
        qkv = _dense((kv, g + 2, hd), ("embed", "kv_heads", None, "head_dim"), cfg, cfg.qkv_bias,
                     name="qkv")(x_btd)
        q = qkv[:, :, :, :g].reshape(b, t, h, hd)  # query head j uses key head j // g
        k = qkv[:, :, :, g]
        v = qkv[:, :, :, g + 1]
        if cfg.arch == "llama":
            q = rope(q, positions_bt, cfg)
            k = rope(k, positions_bt, cfg)
        k_bkds = k.transpose(0, 2, 3, 1)  # the cache layout, see cache_shapes
        v_bksd = v.transpose(0, 2, 1, 3)
        new_cache, k_bkds, v_bksd, key_mask_bs = write_cache(layer_cache, k_bkds, v_bksd, key_mask_bs,
                                                             cache_index)
        out = attend(q, k_bkds, v_bksd, key_mask_bs, cache_index, cfg.compute_dtype, cfg.matmul_dtype)
        out = _dense(cfg.d_model, ("heads", "head_dim", "embed"), cfg, cfg.out_bias,
                     axis=(-2, -1), name="o")(out)
        return out, new_cache


def write_cache(layer_cache, k_bkds, v_bksd, key_mask_bs, cache_index):
    """Writes the new keys/values at `cache_index` of the layer's cache (if any).

    Returns (new cache or None, keys, values, key mask) for `attend` to read:
    the whole cache, or only the new entries when the cache is written from
    slot 0 (the sampler's prefill), since a query at slot i may see only slots
    <= i, all of them new, and the cache's empty generation slots are skipped.
    """
    if layer_cache is None:
        return None, k_bkds, v_bksd, key_mask_bs
    ck, cv = layer_cache
    new_cache = (jax.lax.dynamic_update_slice(ck, k_bkds.astype(ck.dtype), (0, 0, 0, cache_index)),
                 jax.lax.dynamic_update_slice(cv, v_bksd.astype(cv.dtype), (0, 0, cache_index, 0)))
    if isinstance(cache_index, int) and cache_index == 0:
        return new_cache, k_bkds, v_bksd, key_mask_bs[:, :k_bkds.shape[-1]]
    return new_cache, new_cache[0], new_cache[1], key_mask_bs


def attend(q_bthd, k_bkds, v_bksd, key_mask_bs, cache_index, compute_dtype, matmul_dtype="float32"):
    """Causal attention of T new queries (at slots cache_index + [0, T)) over S
    keys: q [B, T, H, hd], keys [B, H_kv, hd, S], values [B, H_kv, S, hd] -> [B, T, H, hd].

    The g = H / H_kv query heads sharing a key head are folded into the query
    rows (row r is position r // g), so both products are batched over (batch,
    key head) whatever T is: matmuls, except the decode-step scores below.
    """
    b, t, h, hd = q_bthd.shape
    kv, s = k_bkds.shape[1], k_bkds.shape[-1]
    g = h // kv
    q_bkrd = q_bthd.reshape(b, t, kv, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, hd)
    if t == 1:
        # One query per row (a decode step): a multiply-and-sum over head_dim,
        # which XLA:CPU fuses into one pass over the cached keys, beat the
        # batched [g, hd] x [hd, S] matmuls by about 5% of a batch-32 step
        # (docs/sampler-performance.md; not measured on TPU).
        scores = jnp.sum(q_bkrd.astype(jnp.float32)[..., None] * k_bkds.astype(jnp.float32)[:, :, None],
                         axis=-2)
    else:
        scores = matmul.einsum("bkrd,bkds->bkrs", q_bkrd, k_bkds.astype(q_bthd.dtype), matmul_dtype)
    scores = scores / jnp.sqrt(hd).astype(jnp.float32)
    query_slot = cache_index + jnp.repeat(jnp.arange(t), g)
    causal_rs = jnp.arange(s)[None, :] <= query_slot[:, None]
    allowed = causal_rs[None, None] & key_mask_bs[:, None, None, :].astype(bool)
    scores = jnp.where(allowed, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
    out = matmul.einsum("bkrs,bksd->bkrd", probs, v_bksd.astype(compute_dtype), matmul_dtype,
                        out_dtype=compute_dtype)
    return out.reshape(b, kv, t, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)


class Mlp(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        if cfg.arch == "llama":
            # Gate and up in one [D, 2, mlp] kernel: one matmul of twice the width.
            gate_up = _dense((2, cfg.mlp_dim), ("embed", None, "mlp"), cfg, cfg.mlp_bias,
                             name="gate_up")(x)
            hidden = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        else:
            hidden = _dense(cfg.mlp_dim, ("embed", "mlp"), cfg, cfg.mlp_bias, name="up")(x)
            hidden = jax.nn.gelu(hidden, approximate=True)  # GPT-2's "gelu_new"
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return _dense(cfg.d_model, ("mlp", "embed"), cfg, cfg.mlp_bias, name="down")(hidden)


class Block(nn.Module):
    """One pre-norm transformer layer. Signature fits `nn.scan`: (carry, *xs)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions_bt, key_mask_bs, cache_index, layer_cache):
        cfg = self.config
        attn_out, new_cache = Attention(cfg, name="attn")(
            Norm(cfg, name="attn_norm")(x), positions_bt, key_mask_bs, cache_index, layer_cache)
        x = x + attn_out
        x = x + Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_cache


def _remat_policy(name: str):
    return {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class Transformer(nn.Module):
    """Decoder trunk plus the heads named in `config.heads`.

    Returns ({"hidden": [B,T,D], "logits": [B,T,V] if "lm", "scalar": [B,T] if
    "scalar"}, new_cache). `last_only=True` applies the heads to the final
    position only (prefill in the sampler needs just that); `head_span=(start,
    stop)` to positions start..stop-1 only (PPO reads the answer's positions:
    the LM head over the prompt would be a quarter of a step's work).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens_bt, positions_bt, key_mask_bs, cache: Optional[KVCache] = None,
                 cache_index: Any = 0, last_only: bool = False,
                 head_span: Optional[tuple[int, int]] = None):
        cfg = self.config
        embedding = self.param("embed", _param_init(("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
        x = jnp.take(embedding, tokens_bt, axis=0).astype(cfg.compute_dtype)
        if cfg.arch == "gpt2":
            pos_table = self.param("pos_embed", _param_init((None, "embed"), nn.initializers.normal(0.01)),
                                   (cfg.max_seq_len, cfg.d_model), cfg.weight_dtype)
            x = x + jnp.take(pos_table, positions_bt, axis=0).astype(cfg.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            cache_axis = 0 if cache is not None else nn.broadcast
            layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, cache_axis),
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            layer_caches = (cache["k"], cache["v"]) if cache is not None else None
            x, new_kv = layers(x, positions_bt, key_mask_bs, cache_index, layer_caches)
            new_cache = {"k": new_kv[0], "v": new_kv[1]} if cache is not None else None
        else:
            # A cache given as per-layer lists stays one: a decode loop carrying
            # separate buffers updates each in place, where slicing and re-stacking
            # an [L, ...] array would copy the whole cache every step.
            per_layer = cache is not None and isinstance(cache["k"], (list, tuple))
            new_k, new_v = [], []
            for i in range(cfg.num_layers):
                layer_cache = (cache["k"][i], cache["v"][i]) if cache is not None else None
                x, kv = block(cfg, name=f"layers_{i}")(x, positions_bt, key_mask_bs, cache_index,
                                                        layer_cache)
                if cache is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
            if cache is None:
                new_cache = None
            elif per_layer:
                new_cache = {"k": new_k, "v": new_v}
            else:
                new_cache = {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}

        x = Norm(cfg, name="final_norm")(x)
        if last_only:
            x = x[:, -1:]
        elif head_span is not None:
            x = x[:, head_span[0]:head_span[1]]
        outputs = {"hidden": x}
        if "lm" in cfg.heads:
            if cfg.tie_embeddings:
                logits = matmul.einsum("btd,vd->btv", x, embedding.astype(cfg.compute_dtype),
                                       cfg.matmul_dtype)
            else:
                logits = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, False, name="lm_head")(x)
            outputs["logits"] = logits.astype(jnp.float32)
        if "scalar" in cfg.heads:
            head = nn.Dense(1, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                            kernel_init=_param_init(("embed", None), nn.initializers.zeros),
                            bias_init=_param_init((None,), nn.initializers.zeros),
                            name="scalar_head")
            outputs["scalar"] = head(x.astype(jnp.float32))[..., 0]
        return outputs, new_cache


def positions_from_mask(mask_bt):
    """Position ids for left-padded rows: 0 at each row's first real token."""
    mask = mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def last_valid_index(mask_bt):
    """Index of the last position with mask 1 in each row (0 for empty rows)."""
    valid = mask_bt > 0
    t = mask_bt.shape[-1]
    last = t - 1 - jnp.argmax(jnp.flip(valid, axis=-1), axis=-1)
    return jnp.where(valid.any(axis=-1), last, 0)


@functools.partial(jax.jit, static_argnums=(0,))
def _init_params(config: TransformerConfig, rng):
    model = Transformer(config)
    tokens = jnp.zeros((1, 4), jnp.int32)
    return model.init(rng, tokens, jnp.arange(4)[None], jnp.ones((1, 4), bool))["params"]


def init_params(config: TransformerConfig, rng) -> dict:
    """Random parameters (logical-axis metadata stripped: a plain pytree)."""
    return nn.meta.unbox(_init_params(config, rng))


def abstract_params(config: TransformerConfig) -> dict:
    """Shapes/dtypes of the parameters, boxed with their logical axis names."""
    model = Transformer(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                             jnp.arange(4)[None], jnp.ones((1, 4), bool)))["params"]
