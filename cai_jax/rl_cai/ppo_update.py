"""The jitted PPO update: forward passes over prompt+answer, the policy and value
losses, advantages, and several epochs of shuffled minibatch steps.

A rollout batch is a dict of equally long rows:

    tokens          [B, T]  int   prompt left-padded to P, then the answer
                                  right-padded to A (T = P + A)
    attention_mask  [B, T]  1 on real prompt and answer tokens
    action_mask     [B, A]  1 on the answer tokens the policy sampled
    logp_old        [B, A]  log-prob of each answer token at rollout time
    values_old      [B, A]  value estimate before each answer token
    advantages      [B, A]  whitened GAE advantages
    returns         [B, A]  GAE returns (value targets)

The prompt width P is never passed: it is T - A, read from the shapes. The
output at position P - 1 + j predicts answer token j and is also the state
whose value is V_j. Steps come from the training harness (training/trainer.py),
so they are jit with in/out shardings and the train state donated, and losses are
(sum, token count) pairs: gradient accumulation and minibatching give the true
mean over tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import sharding as shd
from cai_jax.models.transformer import Transformer, positions_from_mask
from cai_jax.rl_cai import ppo_math
from cai_jax.training.trainer import NonfiniteBudget, Trainer


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """The numbers an update needs (the stage fills them from config.ppo)."""

    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    entropy_coef: float = 0.0
    value_coef: float = 0.5  # only used with a shared trunk (one loss, one optimizer)
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    advantage_std_floor: float = 0.0  # whiten() divides by at least this (ppo_math.whiten)
    epochs: int = 1
    minibatch_size: int = 8
    grad_accum_steps: int = 1


def answer_outputs(model: Transformer, params, tokens_bt, attention_mask_bt, answer_len: int,
                   temperature: float = 1.0):
    """One forward pass over prompt+answer, sliced to the answer positions.

    Returns {"logp": [B, A] log-prob of each answer token, "logits": [B, A, V]
    (divided by the sampling temperature, so they are the policy that sampled)}
    when the model has an LM head, and {"values": [B, A]} when it has a scalar head.
    """
    positions = positions_from_mask(attention_mask_bt)
    t = tokens_bt.shape[1]
    start = t - answer_len - 1  # the position that predicts the first answer token
    outputs, _ = model.apply({"params": params}, tokens_bt, positions, attention_mask_bt,
                             head_span=(start, t - 1))
    out = {}
    if "logits" in outputs:
        logits = outputs["logits"].astype(jnp.float32) / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        answer = tokens_bt[:, t - answer_len:]
        out["logp"] = jnp.take_along_axis(logp_all, answer[..., None], axis=-1)[..., 0]
        out["logits"] = logits
    if "scalar" in outputs:
        out["values"] = outputs["scalar"].astype(jnp.float32)
    return out


def _policy_terms(out, batch, hyper: PPOHyper):
    mask = batch["action_mask"].astype(jnp.float32)
    pg_sum, count, stats = ppo_math.ppo_policy_loss(
        out["logp"], batch["logp_old"], batch["advantages"], mask, hyper.clip_eps)
    # With a zero coefficient the entropy is a metric only: no backward pass
    # through the [B, A, V] softmax.
    logits = out["logits"] if hyper.entropy_coef else jax.lax.stop_gradient(out["logits"])
    entropy_sum, _ = ppo_math.entropy_from_logits(logits, mask)
    loss_sum = pg_sum - hyper.entropy_coef * entropy_sum
    # The train step divides every metric by the total token count, so report
    # sums: a per-minibatch mean times its count.
    metrics = {"policy_loss": pg_sum, "update_entropy": jax.lax.stop_gradient(entropy_sum),
               **{k: v * count for k, v in stats.items()}}
    return loss_sum, count, metrics


def _value_terms(out, batch, hyper: PPOHyper):
    mask = batch["action_mask"].astype(jnp.float32)
    v_sum, count = ppo_math.value_loss(out["values"], batch["values_old"], batch["returns"], mask,
                                       hyper.value_clip_eps)
    clipped = jnp.abs(out["values"] - batch["values_old"]) > hyper.value_clip_eps
    metrics = {"value_loss": v_sum,
               "value_clip_frac": jax.lax.stop_gradient(jnp.sum(clipped * mask))}
    return v_sum, count, metrics


def make_policy_loss(model: Transformer, hyper: PPOHyper):
    """loss_fn(params, batch, rng) -> (sum, token count, metric sums) for the policy."""
    def loss_fn(params, batch, rng):
        del rng
        answer_len = batch["action_mask"].shape[1]
        out = answer_outputs(model, params, batch["tokens"], batch["attention_mask"], answer_len,
                             hyper.temperature)
        return _policy_terms(out, batch, hyper)
    return loss_fn


def make_value_loss(model: Transformer, hyper: PPOHyper):
    def loss_fn(params, batch, rng):
        del rng
        answer_len = batch["action_mask"].shape[1]
        out = answer_outputs(model, params, batch["tokens"], batch["attention_mask"], answer_len)
        return _value_terms(out, batch, hyper)
    return loss_fn


def make_shared_loss(model: Transformer, hyper: PPOHyper):
    """Policy and value on one trunk (heads lm + scalar): one forward pass, one
    loss = policy + value_coef * value, both over the same answer tokens."""
    def loss_fn(params, batch, rng):
        del rng
        answer_len = batch["action_mask"].shape[1]
        out = answer_outputs(model, params, batch["tokens"], batch["attention_mask"], answer_len,
                             hyper.temperature)
        p_sum, count, p_metrics = _policy_terms(out, batch, hyper)
        v_sum, _, v_metrics = _value_terms(out, batch, hyper)
        return p_sum + hyper.value_coef * v_sum, count, {**p_metrics, **v_metrics}
    return loss_fn


@jax.jit
def _advantages(rewards, values, mask, gamma, lam):
    return ppo_math.gae(rewards, values, mask, gamma, lam)


def compute_advantages(rewards_ba, values_ba, mask_ba, hyper: PPOHyper):
    """GAE over the answer tokens, then (optionally) whitened over the whole
    rollout batch. Returns NumPy (advantages, returns)."""
    mask = jnp.asarray(mask_ba, jnp.float32)
    adv, returns = _advantages(jnp.asarray(rewards_ba, jnp.float32),
                               jnp.asarray(values_ba, jnp.float32), mask,
                               jnp.float32(hyper.gamma), jnp.float32(hyper.lam))
    if hyper.whiten_advantages:
        adv = ppo_math.whiten(adv, mask, min_std=hyper.advantage_std_floor)
    return np.asarray(adv), np.asarray(returns)


@dataclasses.dataclass
class PPOSteps:
    """The policy and value trainers of one PPO setup (training/trainer.py: their
    abstract states, shardings and jitted steps). With a shared trunk `value` is
    None and the policy's step trains both heads."""

    hyper: PPOHyper
    policy: Trainer
    value: Optional[Trainer]

    @property
    def batch_sharding(self):
        return self.policy.batch_sharding


def build_ppo_steps(*, mesh, hyper: PPOHyper, policy_config, policy_optimizer,
                    value_config=None, value_optimizer=None, num_steps: Optional[int] = None,
                    rules=shd.DEFAULT_RULES, max_nonfinite_skips: int = 0) -> PPOSteps:
    """The trainers of the policy (heads lm, or lm + scalar for a shared trunk:
    pass no value config) and the value model. Optimizers are optimizer
    sections fitted to `num_steps` optimizer steps (or optax transformations)."""
    batch_sharding = shd.data_sharding(mesh, 2, rules)
    shared = value_config is None
    policy_loss = make_shared_loss if shared else make_policy_loss
    policy = Trainer(policy_config, lambda model: policy_loss(model, hyper), policy_optimizer, mesh,
                     batch_sharding=batch_sharding, num_steps=num_steps,
                     grad_accum_steps=hyper.grad_accum_steps, rules=rules,
                     max_nonfinite_skips=max_nonfinite_skips)
    value = None
    if not shared:
        value = Trainer(value_config, lambda model: make_value_loss(model, hyper), value_optimizer, mesh,
                        batch_sharding=batch_sharding, num_steps=num_steps,
                        grad_accum_steps=hyper.grad_accum_steps, rules=rules,
                        max_nonfinite_skips=max_nonfinite_skips)
    return PPOSteps(hyper, policy, value)


UPDATE_KEYS = ("tokens", "attention_mask", "action_mask", "logp_old", "values_old", "advantages",
               "returns")


def _weighted_mean(history: list[tuple[float, dict]]) -> dict:
    """Token-weighted mean of per-minibatch metric means (so the result is the
    mean over all tokens the epochs saw)."""
    total = sum(w for w, _ in history)
    keys = history[0][1].keys()
    return {k: sum(w * m[k] for w, m in history) / max(total, 1e-9) for k in keys}


def ppo_update(steps: PPOSteps, policy_state, value_state, batch: dict, rng: jax.Array,
               where: str = "ppo update", budget: Optional[NonfiniteBudget] = None):
    """`hyper.epochs` passes over the rollout batch in shuffled minibatches
    (a fresh permutation per epoch from `rng`). Returns (policy_state,
    value_state, metrics averaged over all minibatches). A non-finite loss,
    gradient or update raises DivergenceError naming `where` (the iteration),
    the minibatch and the model; the caller has saved nothing of it yet.
    With a `budget` that allows it, such a minibatch is skipped instead (its
    step left the state as it was) and kept out of the metrics."""
    hyper = steps.hyper
    budget = budget or NonfiniteBudget(0)
    batch = {k: np.asarray(batch[k]) for k in UPDATE_KEYS}
    size = batch["tokens"].shape[0]
    if size % hyper.minibatch_size:
        raise ValueError(f"config.ppo: rollout batch {size} is not a multiple of "
                         f"minibatch_size {hyper.minibatch_size}")
    per_minibatch = size // hyper.minibatch_size
    policy_hist, value_hist = [], []
    for epoch in range(hyper.epochs):
        epoch_key = jax.random.fold_in(rng, epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(epoch_key, 0), size))
        for i in range(per_minibatch):
            rows = order[i * hyper.minibatch_size:(i + 1) * hyper.minibatch_size]
            mb = {k: jax.device_put(v[rows], steps.batch_sharding) for k, v in batch.items()}
            step_key = jax.random.fold_in(epoch_key, i + 1)
            policy_state, pm = steps.policy.train_step(policy_state, mb, step_key)
            pm = {k: float(v) for k, v in pm.items()}
            if not budget.check(pm, f"{where}, epoch {epoch + 1}, minibatch {i + 1}, policy"):
                policy_hist.append((pm["denominator"], pm))
            if steps.value is not None:
                value_state, vm = steps.value.train_step(value_state, mb, step_key)
                vm = {k: float(v) for k, v in vm.items()}
                if not budget.check(vm, f"{where}, epoch {epoch + 1}, minibatch {i + 1}, value model"):
                    value_hist.append((vm["denominator"], vm))
    metrics = {"skipped_nonfinite": float(budget.used)} if budget.allowed else {}
    policy_mean = _weighted_mean(policy_hist) if policy_hist else {}
    for key, value in policy_mean.items():
        if key in ("loss", "denominator", "update_norm"):
            continue
        metrics["policy_grad_norm" if key == "grad_norm" else key] = value
    if value_hist:
        value_mean = _weighted_mean(value_hist)
        metrics["value_loss"] = value_mean["value_loss"]
        metrics["value_clip_frac"] = value_mean["value_clip_frac"]
        metrics["value_grad_norm"] = value_mean["grad_norm"]
    return policy_state, value_state, metrics
