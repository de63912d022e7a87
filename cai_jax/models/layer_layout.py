"""The two layouts of the layers' parameters, and the moves between them.

Scanned: one `layers` entry whose arrays carry a leading [L] axis (the Flax
model with `scan_layers`, and what the weight converters write). Unrolled:
`layers_0 ... layers_{L-1}`, one entry per layer (the model without it).
They live here, beside the model that names them, so that the sampler's
feature-major trunk and the weight loaders (`weights/layout.py`) share them.
"""
from __future__ import annotations

import jax
import numpy as np


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scan layout (`layers` with a leading axis) -> `layers_0 ... layers_{L-1}`."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def stack_layers(params: dict, num_layers: int) -> dict:
    """`layers_0 ... layers_{L-1}` -> the scan layout, stacked on the host (NumPy)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                 *[params[f"layers_{i}"] for i in range(num_layers)])
    return out
