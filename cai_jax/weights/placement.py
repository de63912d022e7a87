"""Parameters onto devices: from the host whole, or onto a mesh shard by shard.

The weights' readers (weights/loader.py) hand over parameters as views
(weights/views.py), host arrays, or arrays already placed (an orbax restore).
On a mesh each process reads, for each parameter, only the slices its own
devices hold, one slice at a time, so it never holds more of the model than
its shards and one slice on the way.
"""
from __future__ import annotations

import jax
import numpy as np

from cai_jax.weights import views


def to_device_consuming(params: dict) -> dict:
    """Host arrays -> device arrays, dropping each host array once it is copied, so
    loading peaks near one copy of the weights rather than two."""
    out = {}
    for key in list(params):
        value = params.pop(key)
        if isinstance(value, dict):
            out[key] = to_device_consuming(value)
        else:  # waiting for each copy lets the host array go before the next one starts
            out[key] = jax.device_put(value).block_until_ready()
        del value
    return out


def _as_view(weight) -> views.View:
    return weight if isinstance(weight, views.View) else views.from_array(weight)


def host_arrays(weights, dtype) -> dict:
    """Every parameter read whole, one after another, as host arrays of `dtype`."""
    return jax.tree.map(lambda w: np.asarray(_as_view(w).read_all()).astype(dtype, copy=False), weights)


def _array_by_shard(view: views.View, sharding, dtype) -> jax.Array:
    """A global array on `sharding` of which this process reads only the slices
    its own devices hold, one slice at a time, each copied to its devices before
    the next is read. (jax.make_array_from_callback would hold every local
    slice of the parameter on the host at once.)"""
    devices_of: dict[views.Box, list] = {}
    for device, index in sharding.addressable_devices_indices_map(view.shape).items():
        devices_of.setdefault(views.box_of(index, view.shape), []).append(device)
    shards = []
    for box, devices in devices_of.items():  # devices holding the same slice share one read
        host = np.asarray(view.read(box)).astype(dtype, copy=False)
        placed = [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(placed)
        shards += placed
        del host
    return jax.make_array_from_single_device_arrays(view.shape, sharding, shards, dtype=dtype)


def onto_mesh(weights, shardings, dtype) -> dict:
    """Parameters (views, host arrays, or arrays already placed) onto `shardings`."""
    return jax.tree.map(lambda w, s: w if isinstance(w, jax.Array) else _array_by_shard(_as_view(w), s, dtype),
                        weights, shardings)
