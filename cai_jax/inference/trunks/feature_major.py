"""`models/feature_major.py` as the sampler's trunk, named "feature_major":
the model's math with weights-first products, faster on XLA:CPU. It runs on
one device (no mesh, or a one-device mesh) with unrolled layers, and is the
default there.

It wants every kernel transposed: `place_params` makes that copy once and
keeps it while the caller's parameter arrays live (the same arrays passed
again reuse it), so it costs one more copy of the weights in memory.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
from jax.sharding import Mesh

from cai_jax.inference.trunks.base import (HEAD_DV, HEAD_VD, TRACE_COUNTS, DerivedWhileAlive, Trunk,
                                           transposed)
from cai_jax.models import feature_major as feature_major_model
from cai_jax.models import matmul
from cai_jax.models.config import TransformerConfig


@functools.partial(jax.jit, static_argnums=0)
def _product_operands(trunk: FeatureMajorTrunk, weights):
    return [matmul.stored_operand(w, trunk.config.matmul_dtype) for w in weights]


@functools.partial(jax.jit, static_argnums=0)
def _transposed_layers(trunk: FeatureMajorTrunk, layer_params):
    TRACE_COUNTS["relayout"] += 1
    return feature_major_model.transposed_layers(trunk.config, layer_params)


@dataclasses.dataclass(frozen=True)
class FeatureMajorTrunk(Trunk):
    name: ClassVar[str] = "feature_major"

    @staticmethod
    def can_run(config: TransformerConfig, mesh: Optional[Mesh]) -> bool:
        """One device and unrolled layers: the cache is per-layer buffers and
        nothing is sharded."""
        return (mesh is None or mesh.size == 1) and not config.scan_layers

    def __post_init__(self):
        if not self.can_run(self.config, self.mesh):
            raise ValueError("the feature_major trunk needs one device (no mesh or a one-device mesh) "
                             "and unroll_layers=True")

    def place_params(self, params: dict, memo: DerivedWhileAlive) -> dict:
        return memo.get(params, self._feature_major_params)

    def _feature_major_params(self, params: dict) -> dict:
        cfg = self.config
        layers = {k: v for k, v in params.items() if k.startswith("layers")}
        out = {"embed": params["embed"], "final_norm": params["final_norm"],
               "layers": _transposed_layers(self, layers)}
        if "pos_embed" in params:
            out["pos_embed"] = params["pos_embed"]
        if cfg.tie_embeddings:
            out[HEAD_VD] = params["embed"]
            out[HEAD_DV] = transposed(self, params["embed"], ("embed", "vocab"))
        else:
            kernel = params["lm_head"]["kernel"]
            out[HEAD_VD], out[HEAD_DV] = transposed(self, kernel, ("vocab", "embed")), kernel
        if cfg.matmul_dtype != "float32":
            out[HEAD_VD], out[HEAD_DV] = _product_operands(self, (out[HEAD_VD], out[HEAD_DV]))
        return out

    def forward(self, params, tokens_bt, positions_bt, key_mask_bs, cache=None, cache_index=0,
                last_only=False):
        return feature_major_model.forward(self.config, params, tokens_bt, positions_bt, key_mask_bs,
                                           cache, cache_index, last_only)

    def logits_vb(self, params, hidden_dn):
        return feature_major_model.logits_vb(self.config, params[HEAD_VD], params[HEAD_DV], hidden_dn)
