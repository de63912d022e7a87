"""The model an ahead-of-time compile is for: a ladder size, or an HF config.json alone.

`tools.aot` compiles with abstract parameters, so it needs the model's shapes
and nothing else. `config.model.name` picks a ladder entry as for a run;
`--config.model.source=hf:DIR` reads the shapes from DIR/config.json instead
and never opens a weight file, so DIR may hold only that file: a user can
ask whether Qwen2.5-7B-Instruct fits a slice with its 1 KB config, without
its 15 GB of weights. The run's runtime fields (dtype, param_dtype, remat,
scan_layers, matmul_dtype, heads, max_seq_len) apply on top, as
`weights.loader.load_model` applies them to real weights.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from cai_jax.models.config import FIELDS, TransformerConfig, hf_features_not_modelled, model_config_from_dict


class NoUsableModelConfig(ValueError):
    """hf:DIR gives no shapes: no directory, no config.json, or one we cannot read."""


def model_for_aot(model: Mapping[str, Any]) -> tuple[TransformerConfig, str, list[str]]:
    """(config, the model's name for the report, notes) for a `config.model`
    section. Notes say what the compile cannot show (see
    `models.config.hf_features_not_modelled`)."""
    model = dict(model)
    source = str(model.get("source") or "")
    if not source.startswith("hf:"):
        return model_config_from_dict(model), str(model.get("name") or "custom"), []
    from cai_jax.weights.loader import RUNTIME_FIELDS

    directory = source[len("hf:"):]
    hf = read_hf_config(directory)
    from cai_jax.weights.hf import config_from_hf
    try:
        cfg = config_from_hf(hf, os.path.join(directory, "config.json"))
    except (KeyError, TypeError, ValueError) as e:
        raise NoUsableModelConfig(f"{source}: config.json is not a usable model config "
                                  f"({type(e).__name__}: {e})") from None
    shapes = sorted(k for k in FIELDS - set(RUNTIME_FIELDS) if model.get(k) is not None)
    if shapes:
        raise NoUsableModelConfig(f"{source} fixes the model's shapes; config.model.{shapes[0]} cannot "
                                  f"override them (only {', '.join(RUNTIME_FIELDS)} can)")
    cfg = cfg.replace(**{k: (tuple(v) if k == "heads" else v) for k, v in model.items()
                         if k in RUNTIME_FIELDS and v is not None})
    return cfg, os.path.basename(os.path.normpath(directory)), hf_features_not_modelled(hf)


def read_hf_config(directory: str) -> dict:
    """DIR/config.json as a dict, or a one-line NoUsableModelConfig."""
    if not os.path.isdir(directory):
        raise NoUsableModelConfig(f"hf:{directory}: no such directory")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        weights = sorted(n for n in os.listdir(directory) if n.endswith((".safetensors", ".bin")))
        held = f"it holds {len(weights)} weight files but" if weights else "it holds neither weights nor"
        raise NoUsableModelConfig(f"hf:{directory}: {held} a config.json; the model's shapes come from "
                                  "config.json (copy the model's own next to its weights)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise NoUsableModelConfig(f"{path} is not readable JSON: {e}") from None
    if not isinstance(hf, dict):
        raise NoUsableModelConfig(f"{path} holds a {type(hf).__name__}, not a model config object")
    return hf
