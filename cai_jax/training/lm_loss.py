"""Next-token cross-entropy on masked targets, as (sum, count) for the train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cai_jax.models.transformer import Transformer, positions_from_mask


def token_logprobs(model: Transformer, params, tokens_bt, attention_mask_bt):
    """log p(tokens[t+1] | tokens[:t+1]) for t in [0, T-1): shape [B, T-1]."""
    positions = positions_from_mask(attention_mask_bt)
    outputs, _ = model.apply({"params": params}, tokens_bt, positions, attention_mask_bt)
    logp = jax.nn.log_softmax(outputs["logits"][:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]


def make_lm_loss(model: Transformer):
    """batch: tokens [B,T] int, attention_mask [B,T], loss_mask [B,T] (1 on the
    tokens to predict, e.g. assistant tokens)."""
    def loss_fn(params, batch, rng):
        del rng
        logp = token_logprobs(model, params, batch["tokens"], batch["attention_mask"])
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return -(logp * mask).sum(), mask.sum(), {}
    return loss_fn
