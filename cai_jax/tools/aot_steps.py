"""Abstract programs for ahead-of-time compilation: what a run's config builds, no arrays.

A step kind is one unit of work of the recipe, built by the same functions the
stages call, from the run's own config (its model section and stage section):

  sft  one optimizer step of the SFT trainer (sl_cai/sft.build_trainer:
       config.sl_train's optimizer, batch_size, grad_accum_steps, max_seq_len)
  pm   one optimizer step of the preference-model trainer
       (rl_cai/preference.build_trainer: config.pm_train)
  ppo  one PPO iteration, as rl_cai/ppo.build_programs and PPORunner build it
       from config.ppo (dtype, ref_dtype, pm_dtype, share_trunk, temperature,
       rollout_batch_size, sample_batch_size, minibatch_size, grad_accum_steps,
       optimizers): the sampler's prefill and decode of the rollout
       (`aot_generate`), the rollout's forward passes (policy and reference
       log-probs, values), the preference model's score, then one minibatch
       update of the policy and one of the value model (one update of both
       heads with a shared trunk)
  score     PPO's scoring passes alone (rollout forward passes, preference model)
  generate  the sampler's prefill and decode for the stage section that
       generates (`aot_generate`: ppo, sl_generate or pairs)

The train steps are the trainers' own (training/trainer.py): `train_step`
with `abstract_state` (`jax.eval_shape`, with the state's shardings).
Batches have the largest shape the stage makes: sl_train.batch_size rows of
min(max_seq_len, the model's) tokens (sft.pad_batch), pm_train.batch_size
pairs (preference.pair_batch), ppo.minibatch_size rows per update and
ppo.rollout_batch_size rows per scoring pass of max_prompt_tokens +
max_new_tokens tokens (rollout.pack_rollout), the preference model reading
at most pm_train.max_seq_len of them. A config without a stage's section (configs/base.py)
gets that stage's defaults.

`build_phases` returns, per kind, the jitted functions with abstract arguments
(`jax.ShapeDtypeStruct`s carrying their shardings), plus the state that stays
on the chips between phases (in PPO: policy and value train states, frozen
reference and preference model) and analytic FLOPs. `cai_jax.tools.aot`
compiles them for a TPU topology.

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
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cai_jax import sharding as shd
from cai_jax.models.transformer import Transformer
from cai_jax.tools import aot_generate
from cai_jax.tools.aot_model import model_for_aot
from cai_jax.tools.aot_phase import (Phase, Phases, abstract_array, abstract_batch, abstract_params_sharded,
                                      abstract_rng, forward_flops, section_of, train_flops)

STEP_KINDS = ("sft", "pm", "ppo", "score", "generate")
SECTIONS = {"sft": "sl_train", "pm": "pm_train", "ppo": "ppo", "score": "ppo"}
SCORING_PHASES = ("rollout_scores", "pm_score")


def batch_shards(mesh, rules=shd.DEFAULT_RULES) -> int:
    """How many device groups split the batch (the mesh axes `batch` maps to)."""
    target = dict(rules).get("batch")
    names = target if isinstance(target, tuple) else (target,)
    return math.prod(mesh.shape[n] for n in names if n)


def check_batch(rows: int, accum: int, mesh, what: str = "batch_size", rules=shd.DEFAULT_RULES) -> None:
    """Each batch shard must get whole rows, and whole micro-batches of them."""
    shards = batch_shards(mesh, rules)
    if rows % shards:
        raise ValueError(f"{what} {rows} is not divisible by the {shards} batch shards of mesh "
                         f"{dict(mesh.shape)} (data x fsdp); change it or --mesh")
    if (rows // shards) % accum:
        raise ValueError(f"{what} {rows}: the {rows // shards} rows of each batch shard are not "
                         f"divisible by grad_accum_steps {accum}")


def grad_accum_for(batch_size: int, mesh, micro_batch_per_shard: int, rules=shd.DEFAULT_RULES) -> int:
    """Micro-steps per optimizer step so each batch shard sees `micro_batch_per_shard` rows."""
    check_batch(batch_size, 1, mesh, rules=rules)
    shards = batch_shards(mesh, rules)
    if micro_batch_per_shard <= 0:
        return 1
    per_shard = batch_size // shards
    accum = max(1, per_shard // micro_batch_per_shard)
    while per_shard % accum:  # the largest divisor not above the target
        accum -= 1
    return accum


# ---------------------------------------------------------------- phases

def stage_section(config, kind: str) -> ml_collections.ConfigDict:
    """A copy of the config's section for step `kind`, or the stage's defaults."""
    return section_of(config, SECTIONS[kind])


def build_phases(kind: str, config, mesh, micro_batch_per_shard: Optional[int] = None,
                 section: str = "ppo", prompt_tokens: Optional[int] = None,
                 shared_prefix: bool = False) -> Phases:
    """The abstract phases of one step of `kind` as `config` runs it on `mesh`.
    `micro_batch_per_shard` replaces the section's grad_accum_steps by the
    accumulation that gives each batch shard that many rows per micro-step.
    `section` (generate only) names the stage section that generates, and
    `prompt_tokens` replaces its longest prompt. `shared_prefix` (generate and
    ppo) adds the sampler's shared-prefix layout (aot_generate.shared_prefix_phases)."""
    if kind not in STEP_KINDS:
        raise ValueError(f"--step is {kind!r}; one of {STEP_KINDS}")
    model_cfg, name, notes = model_for_aot(config.model)
    if kind == "generate":
        phases = _generate_phases(model_cfg, config, mesh, section, prompt_tokens, shared_prefix)
    else:
        stage = stage_section(config, kind)
        if micro_batch_per_shard is not None and kind != "score":
            rows = stage.minibatch_size if kind == "ppo" else stage.batch_size
            stage.grad_accum_steps = grad_accum_for(rows, mesh, micro_batch_per_shard)
        builder = {"sft": _sft_phases, "pm": _pm_phases, "ppo": _ppo_phases, "score": _score_phases}[kind]
        phases = (_ppo_phases(model_cfg, stage, config, mesh, shared_prefix=shared_prefix) if kind == "ppo"
                  else builder(model_cfg, stage, config, mesh))
        if kind == "ppo" and phases.generation is None:
            notes.append("generation is not compiled on one device: the sampler runs its feature-major "
                         "trunk there, which the AOT tool does not model")
    return dataclasses.replace(phases, model_name=name, notes=tuple(notes))


def _train_phase(name: str, trainer, batch: dict, rows: int, seq: int, resident_name: str):
    state = trainer.abstract_state
    model_f, hw_f = train_flops(trainer.model_config, rows, seq)
    return Phase(name, trainer.train_step, (state, abstract_batch(batch, trainer.batch_sharding),
                                             abstract_rng(trainer.mesh)),
                 (resident_name,), model_f, hw_f)


def _sft_phases(cfg, section, config, mesh):
    from cai_jax.sl_cai import sft

    cfg = cfg.replace(heads=("lm",))
    check_batch(section.batch_size, section.grad_accum_steps, mesh, "sl_train.batch_size")
    seq = min(section.max_seq_len, cfg.max_seq_len)
    longest = {"tokens": np.zeros(seq, np.int32), "loss_mask": np.zeros(seq, np.int32)}
    batch = sft.pad_batch([longest], section.min_bucket, seq, pad_id=0, rows=section.batch_size)
    trainer = sft.build_trainer(cfg, section, mesh, section.num_steps or None)
    rows = section.batch_size
    phase = _train_phase("sft_update", trainer, batch, rows, seq, "train_state")
    return Phases("sft", [phase], {"train_state": trainer.abstract_state}, section.grad_accum_steps,
                  rows * seq, cfg, {"batch_size": rows, "seq_len": seq,
                                    "grad_accum_steps": section.grad_accum_steps,
                                    "mu_dtype": section.optimizer.mu_dtype})


def _pm_phases(cfg, section, config, mesh):
    from cai_jax.inference import preference_scorer
    from cai_jax.rl_cai import preference

    cfg = cfg.replace(**preference_scorer.SCALAR_HEAD)
    check_batch(section.batch_size, section.grad_accum_steps, mesh, "pm_train.batch_size")
    seq = min(section.max_seq_len, cfg.max_seq_len)
    longest = {"a": np.zeros(seq, np.int32), "b": np.zeros(seq, np.int32), "p_a": 0.5}
    batch = preference.pair_batch([longest], section.min_bucket, seq, pad_id=0, rows=section.batch_size)
    trainer = preference.build_trainer(cfg, section, mesh, section.num_steps or None)
    pairs = section.batch_size
    phase = _train_phase("pm_update", trainer, batch, 2 * pairs, seq, "train_state")
    return Phases("pm", [phase], {"train_state": trainer.abstract_state}, section.grad_accum_steps,
                  2 * pairs * seq, cfg, {"batch_size": pairs, "seq_len": seq,
                                         "grad_accum_steps": section.grad_accum_steps,
                                         "mu_dtype": section.optimizer.mu_dtype})


def _rollout_rows(rows: int, prompt: int, answer: int) -> dict:
    """Host rows laid out as rollout.pack_rollout and PPORunner.iteration make them."""
    tokens = {k: np.zeros((rows, prompt + answer), np.int32) for k in ("tokens", "attention_mask")}
    per_answer = {k: np.zeros((rows, answer), np.float32)
                  for k in ("action_mask", "logp_old", "values_old", "advantages", "returns")}
    return {**tokens, **per_answer}


def _ppo_phases(cfg, c, config, mesh, with_generation: Optional[bool] = None, shared_prefix: bool = False):
    from cai_jax.inference import preference_scorer
    from cai_jax.rl_cai import ppo

    ppo.check_config(c, mesh)
    prompt, answer = c.max_prompt_tokens, c.max_new_tokens
    seq = prompt + answer
    if seq > cfg.max_seq_len and cfg.arch == "gpt2":
        raise ValueError(f"ppo.max_prompt_tokens + max_new_tokens ({seq}) exceeds the model's "
                         f"learned positions ({cfg.max_seq_len})")
    overrides = ppo.model_overrides(c)
    policy_cfg = cfg.replace(**overrides["policy"])
    value_cfg = None if c.share_trunk else cfg.replace(**overrides["value"])
    pm_cfg = cfg.replace(**overrides["preference_model"])
    programs = ppo.build_programs(c, mesh, policy_cfg, value_cfg)
    steps = programs.steps
    rows, minibatch = c.rollout_batch_size, c.minibatch_size

    data = shd.data_sharding(mesh, 2)
    update_batch = abstract_batch(_rollout_rows(minibatch, prompt, answer), steps.batch_sharding)
    rollout = abstract_batch(_rollout_rows(rows, prompt, answer), data)
    rng = abstract_rng(mesh)
    ref_params = abstract_params_sharded(programs.ref_config, mesh)
    pm_params = abstract_params_sharded(pm_cfg, mesh)
    # The preference model re-reads prompt + answer, at most its training length.
    pm_seq = min(seq, stage_section(config, "pm").max_seq_len, cfg.max_seq_len)
    pm_rows = {k: abstract_array((rows, pm_seq), jnp.int32, data) for k in ("tokens", "mask")}
    pm_score = jax.jit(preference_scorer.make_score_fn(Transformer(pm_cfg)))

    policy_state = steps.policy.abstract_state
    value_state = steps.value.abstract_state if steps.value is not None else None
    policy_model_f, policy_hw_f = train_flops(policy_cfg, minibatch, seq)
    scoring_flops = forward_flops(policy_cfg, rows, seq) + forward_flops(programs.ref_config, rows, seq)
    # Listed (and compiled) largest first, so a config that cannot fit fails early.
    phases = [Phase("policy_update", steps.policy.train_step, (policy_state, update_batch, rng),
                    ("policy_params", "policy_opt_state", "rollout_batch"), policy_model_f, policy_hw_f)]
    resident = {"policy_params": policy_state.params,
                "policy_opt_state": (policy_state.step, policy_state.opt_state)}
    if value_state is not None:
        value_model_f, value_hw_f = train_flops(value_cfg, minibatch, seq)
        scoring_flops += forward_flops(value_cfg, rows, seq)
        phases.append(Phase("value_update", steps.value.train_step, (value_state, update_batch, rng),
                            ("value_params", "value_opt_state", "rollout_batch"), value_model_f, value_hw_f))
        resident.update({"value_params": value_state.params,
                         "value_opt_state": (value_state.step, value_state.opt_state)})
    plan = None
    if with_generation is None:  # the sampler's trunk on one device is not modelled (aot_generate)
        with_generation = mesh.size > 1
    if with_generation:  # the rollout: the sampler on the policy's weights
        workload = aot_generate.workload_for(config, "ppo", policy_cfg)
        generation, plan = aot_generate.generate_phases(policy_cfg, workload, mesh, "policy_params",
                                                        policy_cfg.scan_layers, shared_prefix)
        phases += generation
    # The scorer is a plain jit: the shardings come from its abstract arguments.
    phases += [
        Phase("rollout_scores", programs.scorer,
              (policy_state.params, ref_params, value_state.params if value_state is not None else None,
               rollout["tokens"], rollout["attention_mask"], rollout["action_mask"]),
              ("policy_params", "reference", "value_params", "rollout_batch"),
              scoring_flops, scoring_flops),
        Phase("pm_score", pm_score, (pm_params, pm_rows["tokens"], pm_rows["mask"]),
              ("preference_model", "rollout_batch"), forward_flops(pm_cfg, rows, pm_seq),
              forward_flops(pm_cfg, rows, pm_seq)),
    ]
    # Train states split into parameters and the rest, so a phase that reads only
    # the parameters counts the optimizer state as resident-but-not-an-argument.
    resident.update({"reference": ref_params, "preference_model": pm_params,
                     "rollout_batch": update_batch})
    workload = {"batch_size": minibatch, "seq_len": seq, "rollout_batch_size": rows,
                "answer_len": answer, "grad_accum_steps": c.grad_accum_steps,
                "mu_dtype": c.policy_optimizer.mu_dtype, "dtype": c.dtype, "ref_dtype": c.ref_dtype,
                "pm_dtype": c.pm_dtype, "share_trunk": bool(c.share_trunk), "epochs": c.epochs,
                "updates_per_iteration": c.epochs * (rows // minibatch)}
    return Phases("ppo", phases, resident, c.grad_accum_steps, minibatch * seq, policy_cfg, workload, plan)


def _score_phases(cfg, c, config, mesh):
    """PPO's scoring passes alone, with the models they read resident."""
    whole = _ppo_phases(cfg, c, config, mesh, with_generation=False)
    phases = [p for p in whole.phases if p.name in SCORING_PHASES]
    used = {name for p in phases for name in p.uses} - {"rollout_batch"}  # the rollout is an argument
    resident = {k: v for k, v in whole.resident.items() if k in used}
    rows, seq = c.rollout_batch_size, whole.workload["seq_len"]
    workload = {k: whole.workload[k] for k in ("rollout_batch_size", "seq_len", "answer_len", "dtype",
                                               "ref_dtype", "pm_dtype", "share_trunk")}
    return Phases("score", phases, resident, 1, rows * seq, whole.model_config, workload)


def _generate_phases(cfg, config, mesh, section: str, prompt_tokens: Optional[int], shared_prefix: bool):
    """The sampler's prefill and decode for the stage `section`, on the
    weights of the model that section generates with: the policy (in
    ppo.dtype) for ppo, config.model for sl_generate and pairs."""
    from cai_jax.rl_cai import ppo

    if section == "ppo":
        cfg = cfg.replace(**ppo.model_overrides(section_of(config, "ppo"))["policy"])
    cfg = cfg.replace(heads=("lm",))
    workload = aot_generate.workload_for(config, section, cfg, prompt_tokens)
    phases, plan = aot_generate.generate_phases(cfg, workload, mesh, "model_weights", cfg.scan_layers,
                                                shared_prefix)
    resident = {"model_weights": abstract_params_sharded(cfg, mesh)}
    summary = {"section": section, "rows": workload.rows, "batch_size": workload.batch_size,
               "prompt_tokens": workload.prompt_tokens, "answer_len": workload.answer_tokens,
               "dtype": cfg.dtype}
    return Phases("generate", phases, resident, 1, workload.rows * workload.answer_tokens, plan.model_config,
                  summary, plan)
