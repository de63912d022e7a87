"""A resumable training loop shared by SFT and preference-model training.

Order on start (as Levanter does it): build the abstract state, restore the
latest checkpoint if there is one (state, PRNG key and data-iterator state),
and only otherwise use the fresh state. A run killed after any checkpoint
continues with the same batches and keys, so it ends where an unbroken run ends.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from tqdm.auto import tqdm

from cai_jax.training.checkpoint import Checkpointer


def train_loop(*, train_step: Callable, state: Any, state_sharding: Any, data_iter: Any,
               rng: jax.Array, num_steps: int, checkpointer: Optional[Checkpointer],
               save_every: int, writer=None, eval_fn: Optional[Callable] = None,
               eval_every: int = 0, desc: str = "train", progress: bool = True,
               stop_after: Optional[int] = None):
    """Runs `train_step` until `num_steps`. `data_iter` must have get_state() and
    set_state(). `stop_after` (tests) ends early as a kill would, after that step.
    Returns (state, last_metrics)."""
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, state_sharding)
        state, rng, extra = checkpointer.restore(abstract)
        start = int(state.step)
        if "data" in extra:
            data_iter.set_state(extra["data"])
        if writer is not None:
            writer.truncate_from(start + 1)  # steps 1..start are already logged
    metrics = {}
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
    for step in range(start, num_steps):
        batch = next(data_iter)
        rng, step_rng = jax.random.split(rng)
        state, metrics = train_step(state, batch, step_rng)
        done = step + 1
        logged = {k: float(v) for k, v in metrics.items()}
        if eval_fn is not None and eval_every and (done % eval_every == 0 or done == num_steps):
            logged.update({f"eval_{k}": float(v) for k, v in eval_fn(state.params).items()})
        if writer is not None:
            writer.write(done, logged)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k in ("loss", "eval_loss")})
        bar.update(1)
        if checkpointer is not None and (done % save_every == 0 or done == num_steps):
            checkpointer.save(done, state, rng, {"data": data_iter.get_state()})
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    return state, metrics
