"""Checks a whole experiment config before any stage runs.

Stages check their own section when they start, which can be an hour into a
run with five stages done. `check_config` runs those checks up front (calling
the rule where a module defines it, so each rule lives in one place) and adds
the counts, sizes and mesh axes nothing else checks. The first failure is a
UserError naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from cai_jax.errors import UserError

# Counts and sizes -> the smallest allowed value; 0 is allowed where it means
# "all", "auto" (num_steps: train for num_epochs) or "never".
MINIMUM = {
    **{f"{stage}.{key}": 1 for stage in ("sl_train", "pm_train") for key in (
        "batch_size", "grad_accum_steps", "eval_batch_size", "max_seq_len", "min_bucket",
        "keep_checkpoints")},
    **{f"{stage}.{key}": 0 for stage in ("sl_train", "pm_train") for key in (
        "num_steps", "eval_every", "save_every", "max_nonfinite_skips")},
    "ppo.max_nonfinite_skips": 0,
    **{f"ppo.{key}": 1 for key in (
        "iterations", "rollout_batch_size", "minibatch_size", "epochs", "grad_accum_steps",
        "sample_batch_size", "max_new_tokens", "max_prompt_tokens", "save_every", "keep_checkpoints")},
    "ppo.eval_every": 0, "ppo.eval_prompts": 0,
    "pm_train.pmp_steps": 0, "pm_train.pmp_limit": 0, "pm_train.helpful_limit": 0,
    "data.red_team_limit": 0, "data.helpful_limit": 0,
    "sampling.batch_size": 1, "eval.sampling.batch_size": 1,
    "sl_generate.num_revisions": 1, "sl_generate.num_fewshot": 0, "sl_generate.prompts_per_chunk": 1,
    "sl_generate.red_team_limit": 0, "sl_generate.helpful_limit": 0,
    "pairs.red_team_limit": 0, "pairs.helpful_limit": 0, "pairs.max_prompt_tokens": 1, "pairs.batch_size": 1,
    "pairs.pairs_per_prompt": 1,
    **{f"{section}.{key}": 1 for section in ("feedback", "eval.feedback_judge") for key in (
        "batch_size", "max_seq_len", "min_bucket", "num_principles")},
    "feedback.limit": 0,
    "eval.pm_batch_size": 1, "eval.n_bootstrap": 1,
    "eval.red_team_limit": 0, "eval.helpful_limit": 0, "eval.report_prompts": 0,
    "distributed.heartbeat_timeout_seconds": 1,
}
# Lengths of training in passes over the data: used when num_steps is 0.
POSITIVE = ("sl_train.num_epochs", "pm_train.num_epochs")
OPTIMIZERS = ("sl_train.optimizer", "pm_train.optimizer", "ppo.policy_optimizer", "ppo.value_optimizer")
SAMPLING = ("sampling", "eval.sampling")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError for the first bad value; sections a config lacks are not checked.
    The mesh check asks JAX for the device count (after distributed initialisation)."""
    _check_counts(config)
    mesh = _check_mesh(config)
    _check_model(config)
    _check_enums(config)
    _check_stage_rules(config, mesh)


def _get(config, key: str, default=None) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return default
        node = node[part]
    return node


def _reuse(key: str, check: Callable, *args) -> Any:
    """check(*args), its ValueError re-raised as a UserError about `key`."""
    try:
        return check(*args)
    except ValueError as e:
        message = str(e)
        raise UserError(message if message.startswith(f"config.{key}") else f"config.{key}: {message}") from None


def _check_counts(config) -> None:
    for key, minimum in MINIMUM.items():
        value = _get(config, key)
        if value is not None and (not isinstance(value, int) or value < minimum):
            raise UserError(f"config.{key} is {value!r}; it must be an integer >= {minimum}")
    for key in POSITIVE:
        value = _get(config, key)
        if value is not None and not value > 0:
            raise UserError(f"config.{key} is {value!r}; it must be > 0")
    for stage in ("sl_train", "pm_train"):  # train_step splits each batch into equal micro-batches
        batch, accum = _get(config, f"{stage}.batch_size"), _get(config, f"{stage}.grad_accum_steps")
        if batch is not None and accum is not None and batch % accum:
            raise UserError(f"config.{stage}.batch_size ({batch}) must be a multiple of "
                            f"config.{stage}.grad_accum_steps ({accum})")


def _check_mesh(config):
    """The run's mesh as the pipeline will build it (None when the config has no
    mesh section)."""
    from cai_jax import sharding

    sizes = _get(config, "mesh")
    if sizes is None:
        return None
    for axis, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise UserError(f"config.mesh.{axis} is {size!r}; it must be a device count >= 1, "
                            "or -1 for the devices left over")
    return _reuse("mesh", sharding.mesh_from_config, config)


def _check_model(config) -> None:
    from cai_jax.config import resolve_model
    from cai_jax.models.config import model_config_from_dict

    if _get(config, "model") is None:
        return
    _, overrides = _reuse("model", resolve_model, config.model)
    _reuse("model", model_config_from_dict, {"name": config.model.name, **overrides})


def _check_enums(config) -> None:
    from cai_jax.data.hh_rlhf import check_on_error
    from cai_jax.data.conversation import STYLES

    on_error = _get(config, "data.on_error")
    if on_error is not None:
        _reuse("data.on_error", check_on_error, on_error)
    if _get(config, "data") is not None:
        from cai_jax.data.prompt_sets import KINDS, check_source
        for kind in KINDS:
            check_source(config.data, kind)
    for key in ("data.render", "sl_train.render"):
        style = _get(config, key)
        if style is not None and style not in STYLES:
            raise UserError(f"config.{key} is {style!r}; one of {list(STYLES)}")


def _check_stage_rules(config, mesh) -> None:
    """The checks stages and libraries run when they start."""
    from cai_jax.inference.sampling import SamplingParams
    from cai_jax.training import optimizers

    for key in SAMPLING:
        section = _get(config, key)
        if section is not None:
            _reuse(key, SamplingParams, section.temperature, section.top_k, section.top_p,
                   section.max_new_tokens)
    for key in OPTIMIZERS:
        section = _get(config, key)
        if section is not None:
            _reuse(key, optimizers.make_schedule, optimizers.schedule_config(section, 1))
    if _get(config, "feedback") is not None:
        from cai_jax.rl_cai import feedback
        _reuse("feedback", feedback.check_section, config.feedback)
    if _get(config, "pairs") is not None:
        from cai_jax.rl_cai import pairs
        _reuse("pairs", pairs.check_section, config.pairs)
    if _get(config, "feedback.source") == "construction" and _get(config, "pairs.mode") != "contrastive":
        # Only contrastive pairs record how they were made; found here, not
        # after the pairs stage has run.
        raise UserError(f"config.feedback.source is 'construction', which needs "
                        f"config.pairs.mode='contrastive' (it is {_get(config, 'pairs.mode')!r})")
    fraction = _get(config, "pm_train.judge_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise UserError(f"config.pm_train.judge_fraction is {fraction!r}; it must be in [0, 1) "
                        "(0: no judge PM)")
    for key in ("eval.harmless_judge", "eval.reward_pm_judge", "eval.helpful_judge"):
        if _get(config, key) == "pm_judge" and not fraction:
            raise UserError(f"config.{key} is 'pm_judge', which needs config.pm_train.judge_fraction > 0 "
                            "(the share of prompts whose labels train it)")
    if _get(config, "ppo") is not None and mesh is not None:
        from cai_jax.rl_cai import ppo
        _reuse("ppo", ppo.check_config, config.ppo, mesh)
