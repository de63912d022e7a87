"""Experiment configs: model resolution, validation and loading outside absl.

Experiment files in configs/ define `get_config()` returning a locked
ml_collections ConfigDict. On the command line `--config=configs/x.py
--config.a.b=value` overrides a field; ConfigDict rejects unknown keys and
wrongly typed values. `load_config` does the same for Python callers and tests.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterable, Optional

import ml_collections
from ml_collections import config_dict

from cai_jax.models.config import FIELDS, MODEL_LADDER


def model_section(name: str = "smollm2-135m", source: str = "auto") -> ml_collections.ConfigDict:
    """`model` section: a ladder name, where weights come from, and optional
    per-field overrides (None = keep the ladder's value)."""
    section = {"name": name, "source": source, "dtype": "float32", "param_dtype": "float32",
               "scan_layers": True, "remat": "none"}
    typed = {"vocab_size": int, "d_model": int, "num_layers": int, "num_heads": int,
             "num_kv_heads": int, "head_dim": int, "mlp_dim": int, "max_seq_len": int,
             "rope_theta": float, "norm_eps": float, "tie_embeddings": bool, "qkv_bias": bool,
             "out_bias": bool, "mlp_bias": bool, "arch": str}
    for key, kind in typed.items():
        section[key] = config_dict.placeholder(kind)
    return ml_collections.ConfigDict(section)


def mesh_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def optimizer_section(learning_rate=1e-5, total_steps=100, warmup_steps=10, schedule="cosine"):
    return ml_collections.ConfigDict({
        "learning_rate": learning_rate, "warmup_steps": warmup_steps, "total_steps": total_steps,
        "schedule": schedule, "final_lr_fraction": 0.1, "weight_decay": 0.0, "b1": 0.9, "b2": 0.95,
        "eps": 1e-8, "grad_clip_norm": 1.0, "mu_dtype": config_dict.placeholder(str)})


def resolve_model(model: ml_collections.ConfigDict) -> tuple[str, dict]:
    """(load_model source, overrides) for a `model` section.

    source "auto": the bundled GGUF for smollm2-135m, random init for other sizes.
    """
    if model.name not in MODEL_LADDER:
        raise ValueError(f"config.model.name is {model.name!r}; known: {sorted(MODEL_LADDER)}")
    source = model.source
    if source == "auto":
        source = "smollm2" if model.name == "smollm2-135m" else f"init:{model.name}"
    overrides = {k: v for k, v in model.items() if k in FIELDS and v is not None}
    return source, overrides


def load_config(path: str, overrides: Optional[Iterable[str]] = None) -> ml_collections.ConfigDict:
    """Loads configs/x.py (optionally `path:arg`) and applies "a.b=value" overrides
    with the same parsing and errors as the command line."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=flag_values, lock_config=True)
    argv = ["prog", f"--config={path}"] + [f"--config.{o}" for o in (overrides or [])]
    # config_flags discovers override flags by reading sys.argv itself.
    saved, sys.argv = sys.argv, argv
    try:
        flag_values(argv)
    finally:
        sys.argv = saved
    return flag_values.config


def load_config_module(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
