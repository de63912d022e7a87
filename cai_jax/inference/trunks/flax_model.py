"""The Flax model (`models/transformer.py`) as the sampler's trunk, named
"flax": on a mesh (parameters and cache sharded by their logical axes) or on
one device, with scanned or unrolled layers. The default wherever the
feature-major trunk cannot run (a mesh of several devices, scanned layers).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax

from cai_jax import sharding as shd
from cai_jax.inference.trunks.base import HEAD_VD, TRACE_COUNTS, DerivedWhileAlive, Trunk, transposed
from cai_jax.models import matmul
from cai_jax.models.layer_layout import stack_layers, unstack_layers
from cai_jax.models.transformer import Transformer


@functools.partial(jax.jit, static_argnums=0)
def _relayout(trunk: FlaxModelTrunk, params):
    """Scanned <-> unrolled parameters, placed as the trunk's layout wants."""
    TRACE_COUNTS["relayout"] += 1
    cfg = trunk.config
    if cfg.scan_layers:
        params = stack_layers(params, cfg.num_layers)
    else:
        params = unstack_layers(params, cfg.num_layers)
    if trunk.mesh is None:
        return params
    return jax.lax.with_sharding_constraint(
        params, shd.param_shardings(cfg, trunk.mesh, trunk.rules))


@dataclasses.dataclass(frozen=True)
class FlaxModelTrunk(Trunk):
    name: ClassVar[str] = "flax"

    @functools.cached_property
    def _param_shardings(self):
        return shd.param_shardings(self.config, self.mesh, self.rules)

    def place_params(self, params: dict, memo: DerivedWhileAlive) -> dict:
        """In the trunk's layer layout (parameters in the other one are
        converted once per call) and, on a mesh, as `sharding.param_shardings`
        says (a no-op for parameters already placed so). An untied LM head
        gains a [V, D] copy (HEAD_VD), kept in `memo` while the caller's
        kernel lives."""
        if ("layers" in params) != self.config.scan_layers:
            placed = _relayout(self, params)
        elif self.mesh is not None:
            placed = jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s
                                  else jax.device_put(x, s), params, self._param_shardings)
        else:
            placed = params
        if not self.config.tie_embeddings:
            placed = dict(placed, **{HEAD_VD: memo.get(
                params["lm_head"]["kernel"], lambda kernel: transposed(self, kernel, ("vocab", "embed")))})
        return placed

    def forward(self, params, tokens_bt, positions_bt, key_mask_bs, cache=None, cache_index=0,
                last_only=False):
        params = {k: v for k, v in params.items() if k != HEAD_VD}
        with nn.logical_axis_rules(self.rules):
            out, cache = Transformer(self.config).apply({"params": params}, tokens_bt, positions_bt,
                                                        key_mask_bs, cache=cache,
                                                        cache_index=cache_index, last_only=last_only)
        return out["hidden"].reshape(-1, self.config.d_model).T, cache

    def logits_vb(self, params, hidden_dn):
        cfg = self.config
        # An untied [D, V] kernel contracted on its first axis (kernel.T here)
        # took 88 ms against 14 for a [V, D] copy at 32 rows on XLA:CPU, and a
        # transposed [N, V] product folds back into that slow form: hence HEAD_VD.
        w_vd = params["embed"] if cfg.tie_embeddings else params[HEAD_VD]
        return matmul.einsum("vd,dn->vn", w_vd.astype(cfg.compute_dtype), hidden_dn, cfg.matmul_dtype)
