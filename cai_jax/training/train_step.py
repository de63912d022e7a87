"""The generic sharded train step: `step(state, batch, rng) -> (state, metrics)`.

It is `jax.jit` with explicit in/out shardings and the state donated (pjit as it
is spelled today). Losses return an unreduced sum and a denominator (e.g. the
count of target tokens); micro-batches are summed before dividing, so gradient
accumulation gives exactly the global mean of the full batch.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from cai_jax import sharding as shd

# loss_fn(params, batch, rng) -> (loss_sum, denominator, metric_sums: dict)
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def abstract_train_state(params_abstract, optimizer: optax.GradientTransformation) -> TrainState:
    """The TrainState's shapes and dtypes (jax.eval_shape: nothing is allocated)."""
    return jax.eval_shape(lambda p: init_train_state(p, optimizer), params_abstract)


def state_shardings(param_shardings, optimizer, params_abstract, mesh):
    """Shardings for a TrainState: optimizer moments follow their parameters."""
    abstract_state = abstract_train_state(params_abstract, optimizer)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: shd.replicated(mesh))
    return TrainState(step=shd.replicated(mesh), params=param_shardings, opt_state=opt_shardings)


def split_microbatches(batch: dict, num_micro: int) -> dict:
    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps {num_micro}")
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
    return jax.tree.map(split, batch)


def build_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh,
                     state_sharding: TrainState, batch_sharding, grad_accum_steps: int = 1,
                     rules=shd.DEFAULT_RULES, skip_nonfinite: bool = False):
    """Compiles the step for `mesh`. `batch_sharding` is a pytree of shardings
    matching the batch (or a single sharding for every leaf).

    With `skip_nonfinite`, a step whose loss, gradient norm or update norm is
    not finite keeps the parameters and optimizer state it was given (the
    step counter still advances), so the caller may skip it and go on; the
    state is donated, so without this a bad step's input is gone."""

    def grads_of(params, batch, rng):
        def scalar_loss(p):
            loss_sum, denom, metrics = loss_fn(p, batch, rng)
            return loss_sum, (denom, metrics)
        (loss_sum, (denom, metrics)), grads = jax.value_and_grad(scalar_loss, has_aux=True)(params)
        return loss_sum, denom, metrics, grads

    def step(state: TrainState, batch: dict, rng):
        with nn.logical_axis_rules(rules):
            if grad_accum_steps == 1:
                loss_sum, denom, metrics, grads = grads_of(state.params, batch, rng)
            else:
                micro = split_microbatches(batch, grad_accum_steps)
                rngs = jax.random.split(rng, grad_accum_steps)
                zero = jax.tree.map(jnp.zeros_like, state.params)
                first_metrics = jax.eval_shape(
                    lambda: grads_of(state.params, jax.tree.map(lambda x: x[0], micro), rngs[0])[2])

                def body(carry, xs):
                    g_acc, l_acc, d_acc, m_acc = carry
                    mb, r = xs
                    l, d, m, g = grads_of(state.params, mb, r)
                    return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, d_acc + d,
                            jax.tree.map(jnp.add, m_acc, m)), None

                init = (zero, jnp.zeros(()), jnp.zeros(()),
                        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_metrics))
                (grads, loss_sum, denom, metrics), _ = jax.lax.scan(body, init, (micro, rngs))
        denom = jnp.maximum(denom, 1e-9)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # update_norm: a finite loss and gradient can still give NaN parameters
        # (a NaN learning rate); the divergence guard reads all three.
        out = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "denominator": denom,
               "update_norm": optax.tree.norm(updates)}
        out.update({k: v / denom for k, v in metrics.items()})
        if skip_nonfinite:
            finite = (jnp.isfinite(out["loss"]) & jnp.isfinite(out["grad_norm"])
                      & jnp.isfinite(out["update_norm"]))
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out

    return jax.jit(step, in_shardings=(state_sharding, batch_sharding, shd.replicated(mesh)),
                   out_shardings=(state_sharding, shd.replicated(mesh)), donate_argnums=(0,))
