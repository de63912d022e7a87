"""Optimizer and learning-rate schedule from an `optimizer` ConfigDict."""
from __future__ import annotations

from typing import Mapping

import optax


def make_schedule(cfg: Mapping) -> optax.Schedule:
    lr, warmup, total = cfg["learning_rate"], cfg["warmup_steps"], cfg["total_steps"]
    kind = cfg["schedule"]
    if kind == "constant":
        decay = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=cfg.get("final_lr_fraction", 0.0))
    elif kind == "linear":
        decay = optax.linear_schedule(lr, lr * cfg.get("final_lr_fraction", 0.0), max(total - warmup, 1))
    else:
        raise ValueError(f"optimizer.schedule is {kind!r}; one of constant, cosine, linear")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg: Mapping) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping; `mu_dtype` can keep Adam's first
    moment in bfloat16 to save memory on large models."""
    parts = []
    if cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(cfg["grad_clip_norm"]))
    mu_dtype = cfg.get("mu_dtype") or None
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.95),
                             eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0),
                             mu_dtype=mu_dtype))
    return optax.chain(*parts)
