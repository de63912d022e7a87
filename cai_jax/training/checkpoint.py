"""Resumable training checkpoints (orbax CheckpointManager).

One checkpoint holds the TrainState (params, optimizer state, step), the PRNG
key and a JSON blob (data-iterator state, anything else a stage must resume
with). Restoring takes the target shardings, so a run saved on one mesh resumes
on another. Each saved step's checksum is kept beside the directory
(`<dir>.checksums.json`) and checked before it is restored: a damaged
checkpoint stops the run with its path named instead of resuming from garbage.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cai_jax import artifacts, processes, storage
from cai_jax.errors import UserError


class Checkpointer:
    def __init__(self, directory: str, keep_last: int = 2):
        self.directory = storage.abspath(directory)  # a local path or a gs:// URL
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
            # On the host: a key on one device cannot be saved by several processes.
            rng=ocp.args.StandardSave({"key": np.asarray(jax.random.key_data(rng))}),
            extra=ocp.args.JsonSave(extra or {})))
        self._manager.wait_until_finished()
        if processes.is_writer():
            sums = self._checksums()
            sums[str(step)] = artifacts.content_fingerprint(self._step_dir(step))
            artifacts.write_json_atomic(self._checksums_path(), {s: sums[s] for s in sums
                                                                 if int(s) in self.all_steps()})

    def _step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def _checksums_path(self) -> str:
        return self.directory + artifacts.CHECKSUMS_SUFFIX

    def _checksums(self) -> dict:
        if not storage.exists(self._checksums_path()):
            return {}
        try:
            with storage.open(self._checksums_path()) as f:
                sums = json.load(f)
        except (ValueError, UnicodeDecodeError):
            return {}  # unreadable: nothing to check against (each save rewrites it whole)
        return sums if isinstance(sums, dict) else {}

    def verify(self, step: int) -> None:
        """Raises UserError when `step` differs from what was saved (when its checksum was recorded)."""
        recorded = self._checksums().get(str(step))
        if recorded is not None and artifacts.content_fingerprint(self._step_dir(step)) != recorded:
            raise UserError(f"checkpoint {self._step_dir(step)} does not match the checksum recorded "
                            f"when it was saved (damaged); delete {self.directory} to train from the start")

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, jax.Array, dict]:
        """abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.verify(step)
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
