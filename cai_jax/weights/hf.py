"""Local HF model directories (safetensors + config.json + tokenizer): import and export.

Supported families: Llama, Mistral, Qwen2 (all on our llama path) and GPT-2.
Nothing is downloaded: `directory` must already hold the files.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from cai_jax import storage
from cai_jax.errors import NotModelledError
from cai_jax.models.config import (TransformerConfig, hf_features_not_modelled, hf_rope_parameters,
                                   rope_scaling_from_hf)
from cai_jax.weights import layout, safetensors_files
from cai_jax.weights.safetensors_files import SafetensorsFiles

_LLAMA_LIKE = ("llama", "mistral", "qwen2")


def config_from_hf(hf: dict, source: str = "config.json") -> TransformerConfig:
    model_type = hf.get("model_type")
    if model_type in _LLAMA_LIKE:
        heads = hf["num_attention_heads"]
        try:
            rope_scaling = rope_scaling_from_hf(hf)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return TransformerConfig(
            arch="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            mlp_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf_rope_parameters(hf)["rope_theta"]), rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if model_type == "gpt2":
        d = hf["n_embd"]
        return TransformerConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
            num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
            mlp_dim=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_embeddings=True)
    raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                     f"(one of {_LLAMA_LIKE + ('gpt2',)})")


def config_to_hf(cfg: TransformerConfig):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if cfg.arch == "gpt2":
        return GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                          n_head=cfg.num_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_seq_len,
                          layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                          tie_word_embeddings=True)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_parameters=rope_parameters_to_hf(cfg),
                  tie_word_embeddings=cfg.tie_embeddings)
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        return Qwen2Config(**common)
    if cfg.qkv_bias != cfg.out_bias:
        raise ValueError("HF Llama has one attention_bias switch for q/k/v and o; this model "
                         "has qkv_bias != out_bias and is not Qwen2-shaped")
    return LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **common)


def rope_parameters_to_hf(cfg: TransformerConfig) -> dict:
    """transformers 5's `rope_parameters` for our RoPE (config_from_hf reads them back)."""
    scaling = {} if cfg.rope_scaling is None else \
        {k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items() if v is not None}
    return {"rope_type": "default", **scaling, "rope_theta": cfg.rope_theta}


def read_hf_dir(directory: str) -> tuple[TransformerConfig, SafetensorsFiles]:
    """The directory's config and its tensors, which are read only when (and as
    far as) the layout code's views ask for them. A config asking for what our
    model does not compute (hf_features_not_modelled) is refused: the weights
    would run, and answer wrongly."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: an HF model directory needs config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    not_modelled = hf_features_not_modelled(hf)
    if not_modelled:
        raise NotModelledError(f"{cfg_path}: {not_modelled[0]}; cai_jax cannot run these weights")
    cfg = config_from_hf(hf, cfg_path)
    return cfg, safetensors_files.open_directory(directory)


def write_hf_dir(directory: str, cfg: TransformerConfig, params, tokenizer=None) -> None:
    """Exports params as an HF directory that transformers loads; written atomically."""
    tensors = layout.to_hf(layout.to_scan_layout(params, cfg), cfg)
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
    with storage.local_directory_built(directory) as tmp:
        _write_hf_files(tmp, cfg, tensors, tokenizer)


def _write_hf_files(tmp: str, cfg: TransformerConfig, tensors: dict, tokenizer) -> None:
    from safetensors.numpy import save_file

    hf_cfg = config_to_hf(cfg)
    hf_cfg.architectures = ["GPT2LMHeadModel" if cfg.arch == "gpt2" else
                            type(hf_cfg).__name__.replace("Config", "ForCausalLM")]
    if tokenizer is not None:
        hf_cfg.eos_token_id = tokenizer.eos_token_id
        hf_cfg.bos_token_id = tokenizer.bos_token_id
        hf_cfg.pad_token_id = tokenizer.pad_token_id
        tokenizer.save_pretrained(tmp)
    hf_cfg.save_pretrained(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
