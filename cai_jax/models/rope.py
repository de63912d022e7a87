"""Rotary position embedding (RoPE): the one place its frequencies are computed.

Every path that rotates queries and keys (the Flax model, models/transformer.py;
the sampler's feature-major trunk, models/feature_major.py) calls `rope`, which
takes its frequencies from `inverse_frequencies`, so a model's RoPE scaling
(`TransformerConfig.rope_scaling`) reaches all of them.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from cai_jax.models.config import TransformerConfig


def inverse_frequencies(cfg: TransformerConfig):
    """[head_dim / 2] float32 angular speeds: pair i of a head turns by
    position * speed_i radians. Plain RoPE: theta ** (-i / (head_dim / 2)).

    With `rope_scaling` "linear" every speed is divided by the factor. With
    "llama3" each pair is judged by its wavelength (2 pi / speed) against the
    context it was pretrained on (original_max_position_embeddings, L):
    wavelengths under L / high_freq_factor keep their speed, those over
    L / low_freq_factor are slowed by `factor`, and in between the speed is
    blended: (1 - s) * speed / factor + s * speed, where
    s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    runs from 0 at the slow end of the band to 1 at the fast end. Computed in
    float32, as transformers does.
    """
    half = cfg.head_dim // 2
    speed = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    scaling = cfg.rope_scaling
    if scaling is None:
        return speed
    if scaling.rope_type == "linear":
        return speed / scaling.factor
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / speed
    blend = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * speed / scaling.factor + blend * speed
    slow = wavelength > context / scaling.low_freq_factor
    fast = wavelength < context / scaling.high_freq_factor
    return jnp.where(fast, speed, jnp.where(slow, speed / scaling.factor, blended))


def rope(x_bthd, positions_bt, cfg: TransformerConfig):
    """Rotary embedding of queries or keys [B, T, heads, head_dim] at
    `positions_bt`, HF "rotate half" layout (first half pairs with second)."""
    half = x_bthd.shape[-1] // 2
    angles = positions_bt.astype(jnp.float32)[:, :, None] * inverse_frequencies(cfg)  # [B, T, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x = x_bthd.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return out.astype(x_bthd.dtype)
