"""Multi-host start-up: `jax.distributed.initialize` from config or the TPU environment."""
from __future__ import annotations

import jax

from cai_jax import processes


def maybe_initialize(config) -> None:
    """Initialises the distributed runtime when `config.distributed.enabled`,
    and starts the watch over the other processes (processes.py).

    On TPU VMs all fields may stay empty: JAX discovers the coordinator and
    process ids from the TPU metadata. Elsewhere (e.g. two processes on one
    machine) set coordinator_address, num_processes and process_id.
    `heartbeat_timeout_seconds` is how long a silent process may go before
    the others stop; JAX's own, longer timeout (which aborts with a stack
    trace) stays as the backstop.
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
    timeout = section.get("heartbeat_timeout_seconds", 60)
    jax.distributed.initialize(heartbeat_timeout_seconds=max(100, 2 * int(timeout)), **kwargs)
    processes.watch(timeout)
