"""The one sharding story: a mesh from config, logical axis rules, placing pytrees.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, `layers`); activations use `batch` and `length`. A rule
maps each logical name to a mesh axis (or a tuple of them, or None). A dimension
that the mesh axes do not divide is replicated instead of failing, so that e.g.
SmolLM2's 3 KV heads still run on a tensor axis of 2.

A run builds its mesh once, from `config.mesh`, with `mesh_from_config`: the
pipeline does (after `jax.distributed` is initialised, so it spans every
process's devices) and hands it to each stage in its context; tools, tests and
benchmarks that run a stage's pieces from a config build theirs the same way.
Scorers and samplers take the mesh they run on as a required argument, with no
default (a sampler's may be None: everything on the default device).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Batch over data and fsdp; weights' embed dimension over fsdp (ZeRO-3 style);
# heads/mlp/vocab over tensor (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to "the remaining devices" and checks the product."""
    unknown = [a for a in MESH_AXES if sizes.get(a, 1) == -1]
    extra = set(sizes) - set(MESH_AXES)
    if extra:
        raise ValueError(f"config.mesh has unknown axes {sorted(extra)}; axes are {MESH_AXES}")
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {unknown}")
    known = math.prod(sizes.get(a, 1) for a in MESH_AXES if a not in unknown)
    if num_devices % known:
        raise ValueError(f"config.mesh {dict(sizes)}: {known} does not divide {num_devices} devices")
    shape = tuple(num_devices // known if a in unknown else sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != num_devices:
        raise ValueError(f"config.mesh {dict(sizes)} uses {math.prod(shape)} devices, "
                         f"but {num_devices} are present")
    return shape


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh of `devices` (default: every device of every process) with the
    axis sizes `sizes` (see `mesh_shape`)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(sizes, len(devices))
    try:
        device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # non-TPU topologies or odd shapes: plain order is fine
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def mesh_from_config(config, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The mesh of a run config: `config.mesh`'s axis sizes (config.mesh_section
    holds the default) over `devices` (default: all). Call it after
    `distributed.maybe_initialize`, so that a multi-process run's mesh holds
    every process's devices."""
    if "mesh" not in config:
        raise ValueError("the config has no mesh section (config.mesh_section() makes one)")
    sizes = config.mesh
    return make_mesh(sizes.to_dict() if hasattr(sizes, "to_dict") else dict(sizes), devices)


def rules_from_config(rules: Optional[Iterable]) -> tuple[tuple[str, Any], ...]:
    if not rules:
        return DEFAULT_RULES
    out = []
    for name, target in rules:
        if isinstance(target, list):
            target = tuple(target)
        out.append((name, target))
    return tuple(out)


def _axis_size(mesh: Mesh, target) -> int:
    if target is None:
        return 1
    names = target if isinstance(target, tuple) else (target,)
    return math.prod(mesh.shape[n] for n in names)


def spec_for(shape: Sequence[int], names: Sequence[Optional[str]], mesh: Mesh,
             rules: Sequence[tuple[str, Any]]) -> P:
    """PartitionSpec for an array with logical `names`; undivisible dims replicate
    and a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names):
        target = table.get(name) if name is not None else None
        if target is not None:
            axes = target if isinstance(target, tuple) else (target,)
            axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
            target = axes if len(axes) > 1 else (axes[0] if axes else None)
        if target is not None and dim % _axis_size(mesh, target) == 0:
            used.update(target if isinstance(target, tuple) else (target,))
            spec.append(target)
        else:
            spec.append(None)
    return P(*spec)


def logical_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` (or shape) leaves."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, spec_for(value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def data_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis over the batch mesh axes, the rest replicated."""
    batch = dict(rules).get("batch")
    return NamedSharding(mesh, P(batch, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(tree, shardings):
    """Puts a host/device pytree onto the given shardings."""
    # may_alias=False: the caller keeps its copy even if a train step donates ours.
    return jax.tree.map(lambda x, s: jax.device_put(x, s, may_alias=False), tree, shardings)


def param_shardings(model_config, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings for a model's parameter pytree, from its logical axis names."""
    from cai_jax.models.transformer import abstract_params
    return logical_shardings(abstract_params(model_config), mesh, rules)
