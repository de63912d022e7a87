"""Resumable training checkpoints (orbax CheckpointManager).

One checkpoint holds the TrainState (params, optimizer state, step), the PRNG
key and a JSON blob (data-iterator state, anything else a stage must resume
with). Restoring takes the target shardings, so a run saved on one mesh resumes
on another.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep_last: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, rng: jax.Array, extra: Optional[dict] = None) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            rng=ocp.args.StandardSave({"key": jax.random.key_data(rng)}),
            extra=ocp.args.JsonSave(extra or {})))
        self._manager.wait_until_finished()

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, jax.Array, dict]:
        """abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            rng=ocp.args.StandardRestore(),
            extra=ocp.args.JsonRestore()))
        rng = jax.random.wrap_key_data(jnp.asarray(restored["rng"]["key"]))
        return restored["state"], rng, dict(restored["extra"] or {})

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
