"""Next-token cross-entropy on masked targets, as (sum, count) for the train step.

The LM head's logits are the largest tensor of a step ([B, T, V] float32:
600 MB for 8 x 384 tokens of SmolLM2's 49,152-word vocabulary), and autodiff
through them keeps them for the backward pass and copies their gradient to
[V, B*T] for the head's weight gradient. `target_logprobs` instead computes
them a chunk of positions at a time, in the forward pass and again in the
backward one, so no [B, T, V] array exists and the weight gradient is one
product per chunk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cai_jax.models import matmul
from cai_jax.models.transformer import Transformer, positions_from_mask

# Positions per chunk: [B, 64, V] float32 is 100 MB at B = 8 for SmolLM2.
CHUNK_POSITIONS = 64


def head_weight(model: Transformer, params):
    """The LM head as [V, D]: the tied embedding, or the untied kernel transposed."""
    if model.config.tie_embeddings:
        return params["embed"]
    return params["lm_head"]["kernel"].T


def _chunks(x, chunk: int):
    """[B, T, ...] -> [T / chunk, B, chunk, ...] (T a multiple of chunk)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x):
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _chunk_logits(hidden_bcd, head_vd, matmul_dtype):
    """`head_vd` comes from matmul.stored_operand: rounded once per call, not per chunk."""
    head = matmul.read_operand(head_vd, matmul_dtype, hidden_bcd.dtype)
    return matmul.einsum("bcd,vd->bcv", hidden_bcd, head, matmul_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _target_logprobs(hidden_btd, weight_vd, targets_bt, chunk, matmul_dtype):
    return _target_logprobs_fwd(hidden_btd, weight_vd, targets_bt, chunk, matmul_dtype)[0]


def _target_logprobs_fwd(hidden_btd, weight_vd, targets_bt, chunk, matmul_dtype):
    head_vd = matmul.stored_operand(weight_vd, matmul_dtype)

    def one_chunk(_, xs):
        h, tgt = xs
        logits = _chunk_logits(h, head_vd, matmul_dtype)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return None, (picked - lse, lse)

    _, (logp, lse) = jax.lax.scan(one_chunk, None, (_chunks(hidden_btd, chunk), _chunks(targets_bt, chunk)))
    return _unchunk(logp), (hidden_btd, weight_vd, targets_bt, _unchunk(lse))


def _target_logprobs_bwd(chunk, matmul_dtype, residuals, g_bt):
    hidden_btd, weight_vd, targets_bt, lse_bt = residuals
    vocab = weight_vd.shape[0]
    head_vd = matmul.stored_operand(weight_vd, matmul_dtype)

    def one_chunk(grad_dv, xs):
        h, tgt, lse, g = xs
        probs = jnp.exp(_chunk_logits(h, head_vd, matmul_dtype) - lse[..., None])
        # d logp[target] / d logits = onehot(target) - softmax
        dlogits = g[..., None] * (jax.nn.one_hot(tgt, vocab, dtype=jnp.float32) - probs)
        dlogits = dlogits.astype(h.dtype)
        dh = matmul.einsum("bcv,vd->bcd", dlogits, matmul.read_operand(head_vd, matmul_dtype, h.dtype),
                           matmul_dtype, out_dtype=h.dtype)
        # [D, V], contracting the leading axes of both: no transposed copy of dlogits.
        grad_dv = grad_dv + matmul.einsum("bcd,bcv->dv", h, dlogits, matmul_dtype)
        return grad_dv, dh

    grad_dv = jnp.zeros(weight_vd.shape[::-1], jnp.float32)
    xs = tuple(_chunks(x, chunk) for x in (hidden_btd, targets_bt, lse_bt, g_bt))
    grad_dv, dh = jax.lax.scan(one_chunk, grad_dv, xs)
    return _unchunk(dh), grad_dv.T.astype(weight_vd.dtype), None


_target_logprobs.defvjp(_target_logprobs_fwd, _target_logprobs_bwd)


def target_logprobs(hidden_btd, weight_vd, targets_bt, chunk: int = CHUNK_POSITIONS,
                    matmul_dtype: str = "float32"):
    """log softmax(hidden @ weight.T)[target] per position, [B, T], a chunk of
    positions at a time (equal to the whole-tensor computation up to float
    rounding), the products at `matmul_dtype`. Targets are token ids, [B, T]."""
    t = hidden_btd.shape[1]
    chunk = max(1, min(chunk, t))
    pad = -t % chunk
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    return _target_logprobs(hidden_btd, weight_vd, targets_bt, chunk, matmul_dtype)[:, :t]


def token_logprobs(model: Transformer, params, tokens_bt, attention_mask_bt):
    """log p(tokens[t+1] | tokens[:t+1]) for t in [0, T-1): shape [B, T-1]."""
    positions = positions_from_mask(attention_mask_bt)
    # Only the trunk's output is read: jit drops the model's own [B, T, V] logits.
    outputs, _ = model.apply({"params": params}, tokens_bt, positions, attention_mask_bt)
    return target_logprobs(outputs["hidden"][:, :-1], head_weight(model, params), tokens_bt[:, 1:],
                           matmul_dtype=model.config.matmul_dtype)


def make_lm_loss(model: Transformer):
    """batch: tokens [B,T] int, attention_mask [B,T], loss_mask [B,T] (1 on the
    tokens to predict, e.g. assistant tokens)."""
    def loss_fn(params, batch, rng):
        del rng
        logp = token_logprobs(model, params, batch["tokens"], batch["attention_mask"])
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return -(logp * mask).sum(), mask.sum(), {}
    return loss_fn
