"""Soft Bradley-Terry loss for training a preference model.

In RL-CAI the feedback model gives a probability p_a that response A is the
more harmless one (normalised log-probabilities of the two choices), and the
preference model is trained on these soft labels with the cross-entropy

    loss = -(p_a * log sigmoid(r_a - r_b) + (1 - p_a) * log sigmoid(r_b - r_a))

which reduces to the usual -log sigmoid(r_a - r_b) for hard labels p_a = 1.
Like the PPO losses, it returns an unreduced sum and a count so that
gradient accumulation over micro-batches gives the exact global mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weights(r_a, mask):
    return jnp.ones_like(r_a) if mask is None else jnp.asarray(mask, r_a.dtype)


def soft_bt_loss(r_a, r_b, p_a, mask=None):
    """Summed soft Bradley-Terry cross-entropy, as (sum, count).

    r_a, r_b: preference-model scores of the two responses, any equal shape.
    p_a: target probability that A is preferred, in [0, 1].
    mask: optional 0/1 weights to drop padding pairs from fixed-size batches.
    """
    d = r_a - r_b
    # log_sigmoid stays finite for |d| large, unlike log(sigmoid(d)).
    per_pair = -(p_a * jax.nn.log_sigmoid(d) + (1.0 - p_a) * jax.nn.log_sigmoid(-d))
    w = _weights(r_a, mask)
    # where, not multiply: a NaN label in a padded slot must not leak into the sum.
    return jnp.sum(jnp.where(w > 0, per_pair * w, 0.0)), jnp.sum(w)


def soft_bt_loss_mean(r_a, r_b, p_a, mask=None):
    """Mean soft Bradley-Terry loss over the (unmasked) pairs."""
    total, count = soft_bt_loss(r_a, r_b, p_a, mask)
    return total / jnp.maximum(count, 1.0)


def preference_accuracy(r_a, r_b, p_a, mask=None):
    """How often the scores order the pair like the label, as (n_correct, n_counted).

    Pairs whose label is a tie (p_a == 0.5) are excluded.  A score tie
    (r_a == r_b) predicts neither side and counts as wrong.
    """
    w = _weights(r_a, mask) * (p_a != 0.5)
    correct = jnp.sign(r_a - r_b) == jnp.sign(p_a - 0.5)
    return jnp.sum(correct * w), jnp.sum(w)
