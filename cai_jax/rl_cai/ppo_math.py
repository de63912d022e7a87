"""Pure JAX building blocks for PPO on language models.

All per-token arrays are [batch, time] with a float ``mask`` that is 1 on the
answer (action) tokens and 0 on prompt and padding positions.  The losses
return an unreduced masked SUM and a token COUNT rather than a mean, so a
trainer that accumulates gradients over micro-batches can divide once by the
global count and get the true mean over all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


def masked_sum(x, mask):
    return jnp.sum(x * mask)


def masked_mean(x, mask):
    """Mean over entries with mask 1 (0 if the mask is empty)."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x, mask):
    """Population variance (ddof=0) over entries with mask 1."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def gae(rewards_bt, values_bt, mask_bt, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016).

    Time steps are the masked-in tokens of each row, in order; positions with
    mask 0 are skipped (they neither act nor reset anything), so prompt
    prefixes and right padding both work.  The episode ends at the last
    answer token, so the value after it is 0.

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next

    Returns (advantages_bt, returns_bt) with returns = A + V; both are 0 at
    masked-out positions.
    """
    mask_bt = mask_bt.astype(values_bt.dtype)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        valid = m > 0
        # Masked positions pass the carry through unchanged and output 0.
        carry = (jnp.where(valid, v, next_value), jnp.where(valid, adv, next_adv))
        return carry, jnp.where(valid, adv, 0.0)

    batch = rewards_bt.shape[0]
    zeros = jnp.zeros((batch,), values_bt.dtype)
    # scan runs over the leading axis, so put time first.
    xs = (rewards_bt.T, values_bt.T, mask_bt.T)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
    advantages = adv_tb.T
    returns = (advantages + values_bt) * mask_bt
    return advantages, returns


def whiten(x_bt, mask_bt, shift_mean: bool = True, eps: float = 1e-8, min_std: float = 0.0):
    """Normalise to zero mean, unit variance over the masked entries of the batch.

    With shift_mean=False the original mean is added back (only the scale is
    normalised), as is usual for whitening rewards.  Masked-out entries are 0.
    `min_std` floors the standard deviation divided by: a batch whose values
    barely differ (a policy that gives one answer to every prompt) is not
    blown up to unit variance, which would turn its noise into a full step.
    """
    mean = masked_mean(x_bt, mask_bt)
    var = masked_var(x_bt, mask_bt)
    out = (x_bt - mean) * jax.lax.rsqrt(jnp.maximum(var + eps, min_std * min_std))
    if not shift_mean:
        out = out + mean
    return out * mask_bt


def ppo_policy_loss(logp_new_bt, logp_old_bt, advantages_bt, mask_bt, clip_eps):
    """Clipped surrogate loss of PPO (Schulman et al. 2017), as (sum, count, stats).

    Per token: max(-A * r, -A * clip(r, 1-eps, 1+eps)) with r = exp(new - old).
    stats (means over this batch's masked tokens, no gradient):
      clip_frac:     fraction of tokens where the clipped term is the active one
      approx_kl_k1:  mean(old - new)
      approx_kl_k3:  mean((r - 1) - log r), a non-negative, lower-variance estimate
    """
    log_ratio = logp_new_bt - logp_old_bt
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages_bt * ratio
    clipped = -advantages_bt * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)
    loss_sum = masked_sum(per_token, mask_bt)
    count = jnp.sum(mask_bt)

    log_ratio = jax.lax.stop_gradient(log_ratio)
    ratio = jax.lax.stop_gradient(ratio)
    stats = {
        "clip_frac": masked_mean((clipped > unclipped).astype(ratio.dtype), mask_bt),
        "approx_kl_k1": masked_mean(-log_ratio, mask_bt),
        "approx_kl_k3": masked_mean((ratio - 1.0) - log_ratio, mask_bt),
        "ratio_mean": masked_mean(ratio, mask_bt),
    }
    return loss_sum, count, stats


def value_loss(values_new_bt, values_old_bt, returns_bt, mask_bt, clip_eps):
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2), as (sum, count).

    v_clip keeps the new value within clip_eps of the value at rollout time,
    so the critic cannot jump far on one batch.
    """
    v_clip = values_old_bt + jnp.clip(values_new_bt - values_old_bt, -clip_eps, clip_eps)
    per_token = 0.5 * jnp.maximum(
        jnp.square(values_new_bt - returns_bt), jnp.square(v_clip - returns_bt)
    )
    return masked_sum(per_token, mask_bt), jnp.sum(mask_bt)


def entropy_from_logits(logits_btv, mask_bt):
    """Token entropy of softmax(logits), as (masked sum, count)."""
    logp = jax.nn.log_softmax(logits_btv, axis=-1)
    p = jnp.exp(logp)
    # Zero-probability entries (e.g. -inf logits) must contribute 0, not
    # 0 * -inf = NaN, in both the value and the gradient.
    logp = jnp.where(p > 0, logp, 0.0)
    ent = -jnp.sum(p * logp, axis=-1)
    return masked_sum(ent, mask_bt), jnp.sum(mask_bt)


def kl_penalty_rewards(logp_policy_bt, logp_ref_bt, mask_bt, score_b, beta, last_index_b):
    """Per-token RLHF reward: -beta * (logp_policy - logp_ref), plus the
    preference-model score on each sequence's last answer token.

    Returns (rewards_bt, kl_k1_b, kl_k3_b): the per-sequence sums of the k1
    estimator (logp_policy - logp_ref, unbiased but can be negative) and the
    k3 estimator exp(ref - pol) - 1 - (ref - pol), which is always >= 0.
    """
    log_ratio = (logp_policy_bt - logp_ref_bt) * mask_bt
    rewards = -beta * log_ratio
    rows = jnp.arange(rewards.shape[0])
    rewards = rewards.at[rows, last_index_b].add(jnp.asarray(score_b, rewards.dtype))
    kl_k1 = jnp.sum(log_ratio, axis=-1)
    neg = -log_ratio  # ref - pol, 0 at masked positions so k3 is 0 there
    kl_k3 = jnp.sum((jnp.exp(neg) - 1.0 - neg) * mask_bt, axis=-1)
    return rewards, kl_k1, kl_k3


@dataclass(frozen=True)
class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), as pure functions.

    The state is beta itself.  After observing a mean KL over ``n_steps``
    samples: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon.
    """

    init_beta: float
    target: float
    horizon: float

    def init(self):
        return jnp.asarray(self.init_beta, jnp.float32)

    def update(self, beta, kl, n_steps):
        proportional_error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
        return beta * (1.0 + proportional_error * n_steps / self.horizon)


@dataclass(frozen=True)
class FixedKLController:
    """Constant KL coefficient with the same interface as the adaptive one."""

    init_beta: float

    def init(self):
        return jnp.asarray(self.init_beta, jnp.float32)

    def update(self, beta, kl, n_steps):
        del kl, n_steps
        return beta


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over masked entries.

    1 is a perfect critic, 0 is no better than a constant; NaN if the
    returns have zero variance.
    """
    var_returns = masked_var(returns, mask)
    var_resid = masked_var(returns - values, mask)
    safe = jnp.where(var_returns > 0, var_returns, 1.0)
    return jnp.where(var_returns > 0, 1.0 - var_resid / safe, jnp.nan)
