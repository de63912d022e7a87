"""Optimizer and learning-rate schedule from an `optimizer` ConfigDict."""
from __future__ import annotations

from typing import Mapping, Optional

import optax


def schedule_config(cfg: Mapping, num_steps: Optional[int] = None) -> dict:
    """The optimizer section as a dict, fitted to a run of `num_steps` optimizer
    steps when that is known: total_steps <= 0 means the whole run, and the
    warmup is at most a quarter of it, so a short run still reaches the peak
    rate. Every trainer's optimizer is built through here (training/trainer.py)."""
    out = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if num_steps is not None:
        if out.get("total_steps", 0) <= 0:
            out["total_steps"] = num_steps
        out["warmup_steps"] = min(out["warmup_steps"], num_steps // 4)
    return out


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


def make_optimizer(cfg: Mapping, num_steps: Optional[int] = None) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping; `mu_dtype` can keep Adam's first
    moment in bfloat16 to save memory on large models. `num_steps`: the run's
    length in optimizer steps, when known (see schedule_config)."""
    cfg = schedule_config(cfg, num_steps)
    parts = []
    if cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(cfg["grad_clip_norm"]))
    mu_dtype = cfg.get("mu_dtype") or None
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.95),
                             eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0),
                             mu_dtype=mu_dtype))
    return optax.chain(*parts)
