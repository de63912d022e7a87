"""What every ahead-of-time program is made of: a `Phase` (a jitted function
with abstract, sharded arguments), the analytic FLOPs of the model's passes,
abstract arrays and their bytes per chip, and a stage's config section.
`aot_steps` builds the train steps' and PPO's phases from these, and
`aot_generate` the sampler's; `cai_jax.tools.aot` compiles them.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cai_jax import sharding as shd
from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import abstract_params


@dataclasses.dataclass
class Phase:
    """One jitted function with abstract arguments, ready to `.lower(*args)`."""

    name: str
    fn: Callable
    args: tuple
    # Names of the resident states (keys of `Phases.resident`) passed as arguments.
    uses: tuple[str, ...]
    model_flops: float
    hardware_flops: float
    kwargs: dict = dataclasses.field(default_factory=dict)  # static keyword arguments of `fn`
    # The sampler's prefill or decode: its time is bounded in `aot_generate`
    # (decode by memory), not by model_flops at peak.
    generation: bool = False
    count_loop_collectives: bool = False  # report the collectives of its compiled loop body


@dataclasses.dataclass
class Phases:
    kind: str
    phases: list[Phase]
    # State that lives on the chips for the whole run, as abstract pytrees.
    resident: dict[str, Any]
    grad_accum_steps: int
    tokens_per_step: int
    model_config: TransformerConfig  # the trained model (the policy in PPO)
    workload: dict  # the config numbers that fix the shapes, for the report
    generation: Any = None  # aot_generate.GeneratePlan of the generate phases, if any
    model_name: str = "custom"
    notes: tuple = ()  # what the compile cannot show (aot_model)


# ---------------------------------------------------------------- FLOPs

def matmul_weights(cfg: TransformerConfig) -> int:
    """Weights that multiply each token's activations (embedding lookup excluded,
    the output head included: tied or not, it is a [d, V] matmul)."""
    d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = d * hd * (2 * h + 2 * kv) + (3 if cfg.arch == "llama" else 2) * d * f
    heads = (d * cfg.vocab_size if "lm" in cfg.heads else 0) + (d if "scalar" in cfg.heads else 0)
    return cfg.num_layers * per_layer + heads


def attention_flops(cfg: TransformerConfig, rows: int, seq_len: int) -> float:
    """Scores (QK^T) and weighted values (PV) over all keys, every layer."""
    return float(rows * seq_len) * 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def forward_flops(cfg: TransformerConfig, rows: int, seq_len: int) -> float:
    """FLOPs of one forward pass over [rows, seq_len] tokens."""
    return float(rows * seq_len) * 2 * matmul_weights(cfg) + attention_flops(cfg, rows, seq_len)


def train_flops(cfg: TransformerConfig, rows: int, seq_len: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one gradient over [rows, seq_len]. The
    hardware count adds what rematerialisation recomputes: the whole forward
    (full) or its batched matmuls, i.e. attention (dots_no_batch)."""
    fwd = forward_flops(cfg, rows, seq_len)
    recompute = {"full": fwd, "dots_no_batch": attention_flops(cfg, rows, seq_len),
                 "dots": 0.0, "none": 0.0}[cfg.remat]
    return 3 * fwd, 3 * fwd + recompute


# ---------------------------------------------------------------- abstract values

def abstract_array(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def abstract_params_sharded(cfg: TransformerConfig, mesh, rules=shd.DEFAULT_RULES):
    """Abstract parameters placed as shd.param_shardings places them (frozen models)."""
    boxed = abstract_params(cfg)
    shardings = shd.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(lambda a, s: abstract_array(a.shape, a.dtype, s), nn.meta.unbox(boxed), shardings)


def abstract_batch(batch: dict, sharding) -> dict:
    """A host batch (as the stage's collate function makes it) as abstract arrays
    with the trainer's batch sharding (one sharding, or one per key)."""
    return {k: abstract_array(v.shape, v.dtype, sharding[k] if isinstance(sharding, dict) else sharding)
            for k, v in batch.items()}


def abstract_rng(mesh):
    return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))


def bytes_per_chip(tree) -> int:
    """HBM one device holds for a pytree of sharded abstract arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.number) and leaf.dtype != jnp.bool_:
            continue  # typed PRNG keys: a few bytes
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def section_of(config, name: str) -> ml_collections.ConfigDict:
    """A copy of `config`'s section `name` (sl_train, pm_train, ppo,
    sl_generate, pairs), or that stage's defaults where the config has none
    (configs/base.py's get_config)."""
    if name in config:
        return copy.deepcopy(config[name])
    from cai_jax.rl_cai import pairs, ppo, preference
    from cai_jax.sl_cai import generate, sft
    stages = {"sl_train": sft, "pm_train": preference, "ppo": ppo, "sl_generate": generate, "pairs": pairs}
    return stages[name].get_default_config()
