"""What the sampler asks of a trunk: the model's layers from token ids to the
final hidden states, with the KV cache they read and write, and the LM head.

The sampler (`sampling.py`) places the caller's parameters once per call
(`place_params`); its compiled functions then run `forward` over new tokens
(hidden states come out feature-major, [D, N]) and `logits_vb` on the hidden
states they need ([V, N], as `sampling_choice` takes them). Batching, shared
prefixes, the KV store and choosing tokens are the sampler's own and the same
whatever the trunk.

A trunk is a frozen dataclass because the compiled functions take it as a
static argument: samplers whose trunks are equal share their compilations.
So it holds nothing made from parameters; what `place_params` derives from
the caller's arrays (a transposed copy) lives in the sampler's `memo` and
goes with the sampler.
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import weakref
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from cai_jax import sharding as shd
from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import cache_shapes, init_cache

# How often each compiled function of the sampler and its trunks was traced,
# i.e. compiled (jit traces only on a cache miss). Tests check that a reused
# bucket does not add to these.
TRACE_COUNTS: collections.Counter = collections.Counter()

# The LM head in both orientations, as `place_params` adds them to the
# parameters (see models/feature_major.logits_vb; the Flax trunk adds only
# HEAD_VD, and only for an untied head).
HEAD_VD, HEAD_DV = "head_vd", "head_dv"


class DerivedWhileAlive:
    """A value derived from a pytree of jax arrays, kept only as long as all of
    those arrays live, so that repeated calls with the same arrays derive it
    once without holding on to arrays the caller has dropped. A hit needs every
    leaf to be the very same array object (jax arrays are immutable)."""

    def __init__(self):
        self._refs, self._value = (), None

    def get(self, source, derive):
        leaves = jax.tree.leaves(source)
        if not all(isinstance(x, jax.Array) for x in leaves):  # numpy arrays can change in place
            return derive(source)
        if self._refs and len(self._refs) == len(leaves) and all(
                ref() is leaf for ref, leaf in zip(self._refs, leaves)):
            return self._value
        self._refs, self._value = (), None  # drop the old value before deriving the new one
        value = derive(source)
        self._refs = tuple(weakref.ref(leaf, self._forget) for leaf in leaves)
        self._value = value
        return value

    def _forget(self, ref):
        if any(ref is mine for mine in self._refs):  # `in` would compare live arrays by value
            self._refs, self._value = (), None


@dataclasses.dataclass(frozen=True)
class Trunk(abc.ABC):
    """One way of running the model for the sampler, named by `name`.

    `config` is the sampler's (its `scan_layers` says which layer layout and
    cache layout the trunk runs); `mesh` None means the default device."""

    name: ClassVar[str]

    config: TransformerConfig
    mesh: Optional[Mesh]
    rules: tuple

    @abc.abstractmethod
    def place_params(self, params: dict, memo: DerivedWhileAlive) -> dict:
        """The parameters as `forward` and `logits_vb` take them (on the host,
        once per sampler call); a copy worth keeping across calls goes in `memo`."""

    @abc.abstractmethod
    def forward(self, params, tokens_bt, positions_bt, key_mask_bs, cache=None, cache_index=0,
                last_only: bool = False):
        """(final hidden states feature-major, [D, B*T] or [D, B] with
        `last_only`; the new cache or None). Traced inside the sampler's
        compiled functions; the cache is one `new_cache` made."""

    @abc.abstractmethod
    def logits_vb(self, params, hidden_dn):
        """Float32 logits [V, N] (vocabulary-major, as `choose_tokens` takes them)."""

    # -- the KV cache, the same layout for every trunk (`cache_shapes`)

    def constrain(self, tree, names):
        """Shards every leaf of `tree` by the logical axis `names` (on a mesh)."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, shd.spec_for(x.shape, names, self.mesh, self.rules))), tree)

    @property
    def cache_batch_axis(self) -> int:
        return 1 if self.config.scan_layers else 0

    @property
    def cache_names(self) -> tuple:
        batch_first = ("batch", "kv_heads", None, None)
        return (None,) + batch_first if self.config.scan_layers else batch_first

    def new_cache(self, batch: int, length: int):
        """An empty KV cache: [L, ...] arrays when scanned, else lists of per-layer
        buffers, each updated in place by the decode loop (shapes in `cache_shapes`)."""
        cfg = self.config
        if cfg.scan_layers:
            return self.constrain(init_cache(cfg, batch, length), self.cache_names)
        cache = {name: [jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers)]
                 for name, shape in cache_shapes(cfg, batch, length).items()}
        return self.constrain(cache, self.cache_names)


@functools.partial(jax.jit, static_argnums=(0, 2))
def transposed(trunk: Trunk, w, names: tuple):
    """A [D, V] LM head from a [V, D] one or the reverse (one copy), sharded
    by the logical axis `names` of the result on a mesh."""
    TRACE_COUNTS["lm_head"] += 1
    return trunk.constrain(w.T, names)
