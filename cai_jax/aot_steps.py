"""Abstract train steps for ahead-of-time compilation: every step kind, no arrays.

A step kind is one unit of work of the recipe, built from the same functions
the stages run:

  sft  one optimizer step of next-token cross-entropy (training/lm_loss.py)
  pm   one optimizer step of the preference model: soft Bradley-Terry on the
       scalar head at each answer's last token (rl_cai/preference.make_pm_loss)
  ppo  one PPO iteration after decoding: the rollout's forward passes (policy
       and reference log-probs, values: rl_cai/rollout.build_rollout_scorer;
       preference-model score: rl_cai/preference.make_score_fn), then one
       policy and one value update (rl_cai/ppo_update.build_ppo_steps)

`build_phases` returns, per kind, the jitted functions with abstract arguments
(`jax.ShapeDtypeStruct`s carrying their shardings; train states come from
`jax.eval_shape`), plus the state that stays on the chips between phases
(in PPO: policy and value train states, frozen reference and preference
model) and analytic FLOPs. `cai_jax.tools.aot` compiles them for a TPU
topology.

FLOPs are counted analytically: XLA's cost analysis counts the body of a
`scan` once, not once per layer. Per token, a forward pass costs
2 * (matmul weights) + 4 * layers * keys * heads * head_dim (attention scores
and values over all keys: the model computes the full masked square). A
training step is three forward passes' worth (forward, backward for
activations and weights); full rematerialisation runs the forward once more on
the hardware, which `hardware_flops` includes and MFU does not.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cai_jax import sharding as shd
from cai_jax.config import optimizer_section
from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import Transformer, abstract_params
from cai_jax.rl_cai import ppo_update, preference, rollout
from cai_jax.training import lm_loss, optimizers, train_step as ts

STEP_KINDS = ("sft", "pm", "ppo")


def get_default_config() -> ml_collections.ConfigDict:
    """The workload the compile measures (one optimizer step / PPO iteration)."""
    return ml_collections.ConfigDict({
        # Global rows per optimizer step: sequences (sft), pairs (pm), rollouts (ppo).
        "batch_size": 64,
        "seq_len": 2048,
        # PPO: answer tokens at the end of each row (the prompt fills the rest).
        "answer_len": 512,
        # Rows each batch shard (data x fsdp device group) processes at once;
        # the rest of the batch is gradient accumulation. 0: the whole batch at once.
        "micro_batch_per_shard": 4,
        # Adam's first moment dtype (None: same as the parameters).
        "mu_dtype": ml_collections.config_dict.placeholder(str),
        # Frozen PPO models (reference, preference model) are only read: bfloat16
        # storage halves their memory and is what they compute in anyway.
        "frozen_param_dtype": "bfloat16",
    })


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


@dataclasses.dataclass
class Phases:
    kind: str
    phases: list[Phase]
    # State that lives on the chips for the whole run, as abstract pytrees.
    resident: dict[str, Any]
    grad_accum_steps: int
    tokens_per_step: int


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
    """(abstract params with shardings, their shardings)."""
    boxed = abstract_params(cfg)
    shardings = shd.logical_shardings(boxed, mesh, rules)
    plain = nn.meta.unbox(boxed)
    return jax.tree.map(lambda a, s: abstract_array(a.shape, a.dtype, s), plain, shardings), shardings


def abstract_train_state(params_abstract, param_shardings, optimizer, mesh):
    """(abstract TrainState with shardings, its shardings), via eval_shape."""
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params_abstract)
    state_sharding = ts.state_shardings(param_shardings, optimizer, plain, mesh)
    state = jax.eval_shape(lambda p: ts.init_train_state(p, optimizer), plain)
    state = jax.tree.map(lambda a, s: abstract_array(a.shape, a.dtype, s), state, state_sharding)
    return state, state_sharding


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


def batch_shards(mesh, rules=shd.DEFAULT_RULES) -> int:
    """How many device groups split the batch (the mesh axes `batch` maps to)."""
    target = dict(rules).get("batch")
    names = target if isinstance(target, tuple) else (target,)
    return math.prod(mesh.shape[n] for n in names if n)


def grad_accum_for(batch_size: int, mesh, micro_batch_per_shard: int, rules=shd.DEFAULT_RULES) -> int:
    """Micro-steps per optimizer step so each batch shard sees `micro_batch_per_shard` rows."""
    shards = batch_shards(mesh, rules)
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} batch shards "
                         f"of mesh {dict(mesh.shape)} (data x fsdp); change --batch_size or --mesh")
    if micro_batch_per_shard <= 0:
        return 1
    per_shard = batch_size // shards
    accum = max(1, per_shard // micro_batch_per_shard)
    while per_shard % accum:  # the largest divisor not above the target
        accum -= 1
    return accum


# ---------------------------------------------------------------- phases

def _optimizer(workload) -> Any:
    cfg = optimizer_section()
    cfg.mu_dtype = workload.get("mu_dtype")
    return optimizers.make_optimizer(cfg)


def _rows(shape_tail, dtype, batch_size, mesh, rules):
    return abstract_array((batch_size, *shape_tail), dtype,
                          shd.data_sharding(mesh, 1 + len(shape_tail), rules))


def build_phases(kind: str, model_cfg: TransformerConfig, mesh, workload: Mapping,
                 rules=shd.DEFAULT_RULES) -> Phases:
    """The abstract phases of one step of `kind` for `model_cfg` on `mesh`."""
    if kind not in STEP_KINDS:
        raise ValueError(f"--step is {kind!r}; one of {STEP_KINDS}")
    batch, seq = int(workload["batch_size"]), int(workload["seq_len"])
    if seq > model_cfg.max_seq_len and model_cfg.arch == "gpt2":
        raise ValueError(f"seq_len {seq} exceeds the model's learned positions ({model_cfg.max_seq_len})")
    accum = grad_accum_for(batch, mesh, int(workload["micro_batch_per_shard"]), rules)
    optimizer = _optimizer(workload)
    rng = abstract_rng(mesh)
    builder = {"sft": _sft_phases, "pm": _pm_phases, "ppo": _ppo_phases}[kind]
    return builder(model_cfg, mesh, workload, batch, seq, accum, optimizer, rng, rules)


def _sft_phases(cfg, mesh, workload, batch, seq, accum, optimizer, rng, rules):
    cfg = cfg.replace(heads=("lm",))
    params, psh = abstract_params_sharded(cfg, mesh, rules)
    state, ssh = abstract_train_state(params, psh, optimizer, mesh)
    bsh = shd.data_sharding(mesh, 2, rules)
    step = ts.build_train_step(lm_loss.make_lm_loss(Transformer(cfg)), optimizer, mesh, ssh, bsh,
                               accum, rules)
    data = {k: _rows((seq,), jnp.int32, batch, mesh, rules)
            for k in ("tokens", "attention_mask", "loss_mask")}
    model_f, hw_f = train_flops(cfg, batch, seq)
    phase = Phase("sft_update", step, (state, data, rng), ("train_state",), model_f, hw_f)
    return Phases("sft", [phase], {"train_state": state}, accum, batch * seq)


def _pm_phases(cfg, mesh, workload, batch, seq, accum, optimizer, rng, rules):
    cfg = cfg.replace(heads=("scalar",))
    params, psh = abstract_params_sharded(cfg, mesh, rules)
    state, ssh = abstract_train_state(params, psh, optimizer, mesh)
    bsh = preference.batch_shardings(mesh)
    step = ts.build_train_step(preference.make_pm_loss(Transformer(cfg)), optimizer, mesh, ssh, bsh,
                               accum, rules)
    data = {"tokens": abstract_array((batch, 2, seq), jnp.int32, bsh["tokens"]),
            "mask": abstract_array((batch, 2, seq), jnp.int32, bsh["mask"]),
            "p_a": abstract_array((batch,), jnp.float32, bsh["p_a"]),
            "weight": abstract_array((batch,), jnp.float32, bsh["weight"])}
    model_f, hw_f = train_flops(cfg, 2 * batch, seq)
    phase = Phase("pm_update", step, (state, data, rng), ("train_state",), model_f, hw_f)
    return Phases("pm", [phase], {"train_state": state}, accum, 2 * batch * seq)


def _ppo_phases(cfg, mesh, workload, batch, seq, accum, optimizer, rng, rules):
    answer = int(workload["answer_len"])
    if not 0 < answer < seq:
        raise ValueError(f"answer_len {answer} must be in (0, seq_len={seq})")
    frozen_dtype = workload.get("frozen_param_dtype") or cfg.param_dtype
    policy_cfg = cfg.replace(heads=("lm",))
    value_cfg = cfg.replace(heads=("scalar",))
    ref_cfg = policy_cfg.replace(param_dtype=frozen_dtype)
    pm_cfg = value_cfg.replace(param_dtype=frozen_dtype)

    policy_params, policy_psh = abstract_params_sharded(policy_cfg, mesh, rules)
    value_params, value_psh = abstract_params_sharded(value_cfg, mesh, rules)
    ref_params, ref_psh = abstract_params_sharded(ref_cfg, mesh, rules)
    pm_params, pm_psh = abstract_params_sharded(pm_cfg, mesh, rules)
    policy_state, _ = abstract_train_state(policy_params, policy_psh, optimizer, mesh)
    value_state, _ = abstract_train_state(value_params, value_psh, optimizer, mesh)

    hyper = ppo_update.PPOHyper(minibatch_size=batch, grad_accum_steps=accum)
    steps = ppo_update.build_ppo_steps(
        mesh=mesh, hyper=hyper, policy_model=Transformer(policy_cfg), policy_optimizer=optimizer,
        policy_param_shardings=policy_psh, value_model=Transformer(value_cfg),
        value_optimizer=optimizer, value_param_shardings=value_psh, rules=rules)

    tokens = {k: _rows((seq,), jnp.int32, batch, mesh, rules) for k in ("tokens", "attention_mask")}
    per_answer = {k: _rows((answer,), jnp.float32, batch, mesh, rules)
                  for k in ("action_mask", "logp_old", "values_old", "advantages", "returns")}
    update_batch = {**tokens, **per_answer}

    # The scorer is a plain jit: the shardings come from its abstract arguments.
    scorer = rollout.build_rollout_scorer(Transformer(policy_cfg), Transformer(ref_cfg),
                                          Transformer(value_cfg), temperature=1.0)
    pm_score = jax.jit(preference.make_score_fn(Transformer(pm_cfg)))
    policy_model_f, policy_hw_f = train_flops(policy_cfg, batch, seq)
    value_model_f, value_hw_f = train_flops(value_cfg, batch, seq)
    scoring_flops = (forward_flops(policy_cfg, batch, seq) + forward_flops(ref_cfg, batch, seq)
                     + forward_flops(value_cfg, batch, seq))
    # Listed (and compiled) largest first, so a config that cannot fit fails early.
    phases = [
        Phase("policy_update", steps.policy_step, (policy_state, update_batch, rng),
              ("policy_params", "policy_opt_state", "rollout_batch"), policy_model_f, policy_hw_f),
        Phase("value_update", steps.value_step, (value_state, update_batch, rng),
              ("value_params", "value_opt_state", "rollout_batch"), value_model_f, value_hw_f),
        Phase("rollout_scores", scorer,
              (policy_state.params, ref_params, value_state.params, tokens["tokens"],
               tokens["attention_mask"], per_answer["action_mask"]),
              ("policy_params", "reference", "value_params", "rollout_batch"),
              scoring_flops, scoring_flops),
        Phase("pm_score", pm_score, (pm_params, tokens["tokens"], tokens["attention_mask"]),
              ("preference_model", "rollout_batch"), forward_flops(pm_cfg, batch, seq),
              forward_flops(pm_cfg, batch, seq)),
    ]
    # Train states split into parameters and the rest, so a phase that reads only
    # the parameters counts the optimizer state as resident-but-not-an-argument.
    resident = {
        "policy_params": policy_state.params,
        "policy_opt_state": (policy_state.step, policy_state.opt_state),
        "value_params": value_state.params,
        "value_opt_state": (value_state.step, value_state.opt_state),
        "reference": ref_params,
        "preference_model": pm_params,
        "rollout_batch": update_batch,
    }
    return Phases("ppo", phases, resident, accum, batch * seq)
