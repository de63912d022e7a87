"""Experiment configs: model resolution, validation and loading outside absl.

Experiment files in configs/ define `get_config()` returning a locked
ml_collections ConfigDict. On the command line `--config=configs/x.py
--config.a.b=value` overrides a field; ConfigDict rejects unknown keys and
wrongly typed values. `load_config` does the same for Python callers and tests.
Both go through `parse_config_flags`, which turns a missing file, an unknown
key, a wrongly typed value or a config file that is not valid Python into a
one-line `UserError`.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Iterable, Optional, Sequence

import ml_collections
from ml_collections import config_dict

from cai_jax.errors import UserError
from cai_jax.models.config import FIELDS, MODEL_LADDER


# Ladder sizes with real weights: the packaged model `source="auto"` loads.
PACKAGED_WEIGHTS = {"smollm2-135m": "smollm2", "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct"}


def model_section(name: str = "smollm2-135m", source: str = "auto") -> ml_collections.ConfigDict:
    """`model` section: a ladder name, where weights come from, and optional
    per-field overrides (None = keep the ladder's value)."""
    section = {"name": name, "source": source, "dtype": "float32", "param_dtype": "float32",
               "matmul_dtype": "float32", "scan_layers": True, "remat": "none"}
    typed = {"vocab_size": int, "d_model": int, "num_layers": int, "num_heads": int,
             "num_kv_heads": int, "head_dim": int, "mlp_dim": int, "max_seq_len": int,
             "rope_theta": float, "norm_eps": float, "tie_embeddings": bool, "qkv_bias": bool,
             "out_bias": bool, "mlp_bias": bool, "arch": str}
    for key, kind in typed.items():
        section[key] = config_dict.placeholder(kind)
    return ml_collections.ConfigDict(section)


def mesh_section() -> ml_collections.ConfigDict:
    """`mesh` section: the size of each mesh axis (data, fsdp, tensor), -1 for
    the devices left over; by default every device is on data. A run builds
    its mesh from it once (`sharding.mesh_from_config`)."""
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def optimizer_section(learning_rate=1e-5, total_steps=100, warmup_steps=10, schedule="cosine"):
    return ml_collections.ConfigDict({
        "learning_rate": learning_rate, "warmup_steps": warmup_steps, "total_steps": total_steps,
        "schedule": schedule, "final_lr_fraction": 0.1, "weight_decay": 0.0, "b1": 0.9, "b2": 0.95,
        "eps": 1e-8, "grad_clip_norm": 1.0, "mu_dtype": config_dict.placeholder(str)})


def resolve_model(model: ml_collections.ConfigDict) -> tuple[str, dict]:
    """(load_model source, overrides) for a `model` section.

    source "auto": the packaged GGUF for a size that has one (smollm2-135m,
    qwen2.5-coder-0.5b), random init for the others.
    """
    if model.name not in MODEL_LADDER:
        raise ValueError(f"config.model.name is {model.name!r}; known: {sorted(MODEL_LADDER)}")
    source = model.source
    if source == "auto":
        source = PACKAGED_WEIGHTS.get(model.name, f"init:{model.name}")
    overrides = {k: v for k, v in model.items() if k in FIELDS and v is not None}
    return source, overrides


def load_config(path: str, overrides: Optional[Iterable[str]] = None) -> ml_collections.ConfigDict:
    """Loads configs/x.py (optionally `path:arg`) and applies "a.b=value" overrides
    with the same parsing and errors as the command line."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=flag_values, lock_config=True)
    parse_config_flags(flag_values, ["prog", f"--config={path}"] + [f"--config.{o}" for o in (overrides or [])])
    return flag_values.config


def parse_config_flags(flag_values, argv: Sequence[str]) -> list[str]:
    """flag_values(argv) for flags that include a `--config` file flag, with the
    user's mistakes as a one-line UserError: a missing config file, an override
    of a key the config does not have, a value of the wrong type. Returns the
    arguments left over."""
    from absl import flags

    path, keys = _config_arguments(argv)
    if path is not None:
        _check_config_file(path.split(":", 1)[0])
    # config_flags discovers override flags by reading sys.argv itself.
    saved, sys.argv = sys.argv, list(argv)
    try:
        return flag_values(list(argv))
    except flags.Error as e:  # a wrongly typed value, a missing required flag
        raise UserError(str(e)) from None
    except SyntaxError as e:  # the config file is not valid Python
        raise _syntax_error(e) from None
    except (AttributeError, KeyError) as e:  # ml_collections' way of saying "no such key"
        unknown = _unknown_key_message(path, keys) if path is not None else None
        if unknown is None:
            raise  # not an override's fault: a bug in the config file
        raise UserError(unknown) from e
    finally:
        sys.argv = saved


def _config_arguments(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """(the --config file argument, the keys of the --config.KEY overrides), as absl reads them."""
    path, keys = None, []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    return path, keys


def _unknown_key_message(path: str, keys: Sequence[str]) -> Optional[str]:
    """What is wrong with the first override key the config lacks (None if all exist)."""
    config = load_config(path)
    for key in keys:
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            section = ".".join(["config"] + parts[:depth])
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--config.{key}: {section} is a value, not a section with keys"
            if part not in node:
                known = sorted(node.keys())
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"{section} has keys {known}"
                return f"--config.{key}: unknown config key {part!r} in {section}; {hint}"
            node = node[part]
    return None


def _syntax_error(e: SyntaxError) -> UserError:
    where = f"{e.filename} line {e.lineno}" if e.lineno else e.filename
    return UserError(f"config file {where}: {e.msg} (not valid Python)")


def _check_config_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"config file {path} not found")


def load_config_module(path: str):
    _check_config_file(path)
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise _syntax_error(e) from None
    return module
