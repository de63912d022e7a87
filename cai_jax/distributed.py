"""Multi-host start-up: `jax.distributed.initialize` from config or the TPU environment."""
from __future__ import annotations

import jax


def maybe_initialize(config) -> None:
    """Initialises the distributed runtime when `config.distributed.enabled`.

    On TPU VMs all fields may stay empty: JAX discovers the coordinator and
    process ids from the TPU metadata. Elsewhere (e.g. two processes on one
    machine) set coordinator_address, num_processes and process_id.
    """
    section = config.get("distributed") if hasattr(config, "get") else None
    if not section or not section.get("enabled", False):
        return
    kwargs = {}
    if section.get("coordinator_address"):
        kwargs["coordinator_address"] = section.coordinator_address
    if section.get("num_processes"):
        kwargs["num_processes"] = int(section.num_processes)
    if section.get("process_id") is not None and section.get("process_id") >= 0:
        kwargs["process_id"] = int(section.process_id)
    jax.distributed.initialize(**kwargs)
