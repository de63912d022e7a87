"""The sampler's trunks, chosen by name (`Sampler(..., trunk="flax")`):

  feature_major  `models/feature_major.py`: weights-first products, one device
                 and unrolled layers; the default where it can run
  flax           the Flax model: any mesh, scanned or unrolled layers; the
                 default elsewhere

Both implement `base.Trunk`; a new one joins `TRUNKS`.
"""
from __future__ import annotations

from typing import Optional

from jax.sharding import Mesh

from cai_jax.inference.trunks.base import Trunk
from cai_jax.inference.trunks.feature_major import FeatureMajorTrunk
from cai_jax.inference.trunks.flax_model import FlaxModelTrunk
from cai_jax.models.config import TransformerConfig

TRUNKS: dict[str, type[Trunk]] = {t.name: t for t in (FeatureMajorTrunk, FlaxModelTrunk)}


def default_trunk_name(config: TransformerConfig, mesh: Optional[Mesh]) -> str:
    """feature_major where it can run (faster on XLA:CPU), else flax."""
    return FeatureMajorTrunk.name if FeatureMajorTrunk.can_run(config, mesh) else FlaxModelTrunk.name


def make_trunk(name: Optional[str], config: TransformerConfig, mesh: Optional[Mesh], rules) -> Trunk:
    """The trunk called `name` (None: `default_trunk_name`) for the sampler's
    `config` (whose `scan_layers` says how the layers run) on `mesh`."""
    name = default_trunk_name(config, mesh) if name is None else name
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; the trunks are {', '.join(sorted(TRUNKS))}")
    return TRUNKS[name](config, mesh, tuple(rules))
