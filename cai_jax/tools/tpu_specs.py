"""What one TPU chip offers, per generation: HBM, peak bfloat16 FLOP/s, HBM and ICI bandwidth.

The ahead-of-time compile (`cai_jax.tools.aot`) checks per-chip memory against
`hbm_bytes`, turns FLOPs into a step-time bound with `peak_bf16_flops`, and
bounds a decode step by the bytes it reads (`hbm_bandwidth`) and moves
between chips (`ici_bandwidth`).

Sources (Google Cloud TPU documentation, "System architecture" tables):
  v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s, ICI 2400 Gbps
  v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s, ICI 1600 Gbps
  v5p: https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s, ICI 4800 Gbps
  v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s, ICI 3584 Gbps
ICI is per chip and one direction (the newer pages give twice that as
"bidirectional": 400 GB/s for v5e, 1200 GB/s for v5p).
The documents write "GB" for HBM; the TPU compiler's own out-of-memory report
for v5p gives the available HBM as 95.74G (binary units), so the 95 here is
GiB (slightly conservative).

Slice names: v4-N and v5p-N count TensorCores (two per chip, "megacore", one
JAX device per chip), v5litepod-N and v6e-N count chips. So v5p-128 is the
4x4x4 topology of 64 chips and v5p-64 is 2x4x4 with 32 chips.
"""
from __future__ import annotations

import dataclasses
import math

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    generation: str          # as in topology names: "v5p"
    hbm_bytes: int           # per chip
    peak_bf16_flops: float   # per chip, dense bfloat16 matmul
    hbm_bandwidth: float     # bytes/s per chip
    ici_bandwidth: float     # bytes/s per chip between chips, one direction
    cores_per_chip: int      # TensorCores behind one JAX device
    slice_prefix: str        # accelerator-type prefix, e.g. "v5p" in "v5p-128"
    slice_counts_cores: bool  # True: the number in the slice name counts TensorCores


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GIB, 275e12, 1200e9, 300e9, 2, "v4", True),
    "v5e": ChipSpec("v5e", 16 * GIB, 197e12, 819e9, 200e9, 1, "v5litepod", False),
    "v5p": ChipSpec("v5p", 95 * GIB, 459e12, 2765e9, 600e9, 2, "v5p", True),
    "v6e": ChipSpec("v6e", 32 * GIB, 918e12, 1640e9, 448e9, 1, "v6e", False),
}

# Single-slice shapes from each generation's documentation, smallest first
# (chips = product). v5e's 1x1 is left out: libtpu compiles only whole hosts'
# worth of chip bounds (2x2) for it here.
V5P_TOPOLOGIES = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8",
                  "8x8x16", "8x16x16", "16x16x16")
V5E_TOPOLOGIES = ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
TOPOLOGIES = {"v5p": V5P_TOPOLOGIES, "v5e": V5E_TOPOLOGIES}


def parse_topology(name: str) -> tuple[ChipSpec, tuple[int, ...]]:
    """"v5p:4x4x4" -> (the v5p ChipSpec, (4, 4, 4))."""
    generation, sep, dims = name.partition(":")
    if not sep or not dims:
        raise ValueError(f"--topology is {name!r}; expected GENERATION:AxBxC such as v5p:4x4x4")
    if generation not in CHIPS:
        raise ValueError(f"--topology {name!r}: unknown TPU generation {generation!r}; "
                         f"known: {sorted(CHIPS)}")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        raise ValueError(f"--topology {name!r}: {dims!r} is not a shape like 4x4x4") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"--topology {name!r}: dimensions must be positive")
    return CHIPS[generation], shape


def num_chips(topology: str) -> int:
    return math.prod(parse_topology(topology)[1])


def slice_name(topology: str) -> str:
    """The accelerator type Cloud TPU calls this topology: "v5p:4x4x4" -> "v5p-128"."""
    chip, shape = parse_topology(topology)
    count = math.prod(shape) * (chip.cores_per_chip if chip.slice_counts_cores else 1)
    return f"{chip.slice_prefix}-{count}"
