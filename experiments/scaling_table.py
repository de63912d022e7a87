"""The smallest v5p slice that fits each paper size and step kind, with per-chip memory and FLOPs.

    python experiments/scaling_table.py                       # the full table
    python experiments/scaling_table.py --sizes=52b --kinds=ppo

For every (size, kind) it walks the single-slice v5p topologies from the
smallest, skips those whose resident state (parameters, optimizer state,
frozen models) alone exceeds a chip's HBM, and compiles the step ahead of
time (`cai_jax.tools.aot`) on the next ones until one fits. Results go to
experiments/results/scaling_table.json after every compile (a killed run
resumes where it stopped) and the table is printed as Markdown.

Every cell compiles what `python -m cai_jax.tools.aot` compiles for a run of
configs/default.py with TABLE_OVERRIDES (the steps the stages build from that
config, see cai_jax/tools/aot_steps.py), the defaults experiments/SCALING.md
documents: bfloat16 compute, float32 parameters and Adam moments, full
rematerialisation, mesh tensor=4 x fsdp=(chips / 4), 64 rows of 2048 tokens
per optimizer step (PPO: 64 rollouts of 1536 prompt + 512 answer tokens, one
minibatch) with 4 rows per batch shard per micro-step, the policy and value
computing in bfloat16 and the frozen reference and preference model stored
in bfloat16 (ppo.dtype, ppo.ref_dtype, ppo.pm_dtype). Each compile of a
paper-sized model takes minutes of CPU here.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for TPU needs no local accelerator

import jax  # noqa: E402

from cai_jax import sharding as shd  # noqa: E402
from cai_jax.tools import aot_steps, tpu_specs  # noqa: E402
from cai_jax.artifacts import write_json_atomic  # noqa: E402
from cai_jax.config import load_config  # noqa: E402
from cai_jax.tools import aot  # noqa: E402

PAPER_SIZES = ("810m", "1.6b", "3.5b", "6.4b", "13b", "22b", "52b")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "scaling_table.json")
CONFIG = os.path.join(HERE, "..", "configs", "default.py")
TABLE_OVERRIDES = (
    "model.dtype=bfloat16", "model.param_dtype=float32", "model.remat=full",
    "sl_train.batch_size=64", "sl_train.max_seq_len=2048",
    "pm_train.batch_size=64", "pm_train.max_seq_len=2048",
    "ppo.rollout_batch_size=64", "ppo.minibatch_size=64", "ppo.max_prompt_tokens=1536",
    "ppo.max_new_tokens=512", "ppo.dtype=bfloat16", "ppo.ref_dtype=bfloat16", "ppo.pm_dtype=bfloat16",
)
MICRO_BATCH_PER_SHARD = 4  # tools.aot --micro_batch_per_shard: sets each section's grad_accum_steps
TENSOR = 4
GIB = 2 ** 30


@functools.lru_cache(maxsize=None)
def table_config(size: str, *extra: str):
    """configs/default.py with the table's overrides for model size `size`."""
    return load_config(CONFIG, [f"model.name={size}", *TABLE_OVERRIDES, *extra])


def default_mesh(chips: int) -> dict:
    tensor = TENSOR if chips % TENSOR == 0 else 1
    return {"data": 1, "fsdp": chips // tensor, "tensor": tensor}


def summary(report: aot.AotReport) -> dict:
    return {"status": "fits", "topology": report.topology, "slice": report.slice_name,
            "chips": report.chips, "mesh": report.mesh, "peak_gib": report.peak_bytes / GIB,
            "headroom_gib": (report.hbm_bytes - report.peak_bytes) / GIB,
            "resident_gib": sum(report.resident_bytes.values()) / GIB,
            "model_flops": report.model_flops, "hardware_flops": report.hardware_flops,
            "step_seconds_at_peak": report.step_seconds_at_peak,
            "grad_accum_steps": report.grad_accum_steps,
            "compile_seconds": sum(p.compile_seconds for p in report.phases),
            "phases": {p.name: p.total_bytes / GIB for p in report.phases},
            "report": report.to_dict()}


def trained_state_bytes(phases: aot_steps.Phases) -> int:
    """Per-chip bytes of the largest state a phase trains (its gradients and
    optimizer update make most of the temporaries)."""
    held = {k: aot_steps.bytes_per_chip(v) for k, v in phases.resident.items()}
    if "train_state" in held:
        return held["train_state"]
    return max(held.get(f"{m}_params", 0) + held.get(f"{m}_opt_state", 0) for m in ("policy", "value"))


def estimated_bytes(size: str, kind: str, topology: str) -> float:
    """A cheap lower estimate of the per-chip peak, to skip slices without compiling.

    Compiles needed 2.8x (13B SFT, 8 chips) to 3.7x (52B SFT, 32 chips) the
    train state per chip: the state, plus gradients and optimizer-update
    temporaries. Counting 1.5x on top (2.5x in all) stays below every compile
    seen, so a slice it rules out is very unlikely to fit. (The first table run
    counted 2x; its "estimate" rows say so in experiments/SCALING.md.)
    """
    devices = aot.topology_devices(topology)
    mesh = shd.make_mesh(default_mesh(len(devices)), devices)
    phases = aot_steps.build_phases(kind, table_config(size), mesh, MICRO_BATCH_PER_SHARD)
    resident = sum(aot_steps.bytes_per_chip(v) for v in phases.resident.values())
    return resident + 1.5 * trained_state_bytes(phases)


def smallest_fit(size: str, kind: str, results: dict, save, start_at: int = 0) -> dict:
    """Tries topologies from `start_at` up; records every attempt in `results`.

    A slice is skipped without compiling when the estimate already exceeds a
    chip's HBM (status "estimate"); the first one that compiles within HBM wins.
    """
    for topo in tpu_specs.V5P_TOPOLOGIES[start_at:]:
        topology = f"v5p:{topo}"
        key = f"{size}/{kind}/{topology}"
        if key not in results:
            chips = tpu_specs.num_chips(topology)
            hbm = tpu_specs.CHIPS["v5p"].hbm_bytes
            start = time.time()
            estimate = estimated_bytes(size, kind, topology)
            if estimate > hbm:
                results[key] = {"status": "estimate", "needed_gib": estimate / GIB,
                                "message": f"estimated at least {estimate / GIB:.1f} GiB per chip"}
            else:
                try:
                    report = aot.run_aot(table_config(size), topology, kind, default_mesh(chips),
                                         micro_batch_per_shard=MICRO_BATCH_PER_SHARD,
                                         progress=lambda m: print(f"  {key}: {m}", flush=True))
                    results[key] = summary(report)
                except aot.DoesNotFit as e:
                    results[key] = {"status": "does not fit", "needed_gib": e.needed_bytes / GIB,
                                    "message": str(e), "seconds": time.time() - start}
                except aot.AotConfigError as e:
                    results[key] = {"status": "config error", "message": str(e)}
                jax.clear_caches()
            save()
            print(f"  {key}: {results[key]['status']} ({time.time() - start:.0f}s)"
                  + (f" {results[key]['message']}" if "message" in results[key] else ""), flush=True)
        if results[key]["status"] == "fits":
            return results[key]
    return {"status": "does not fit on any single v5p slice"}


def crosscheck_flops() -> dict:
    """XLA's FLOP count against the analytic one on an unrolled 2-layer 810m-shaped
    model (scan bodies are counted once, so the check needs the layers unrolled)."""
    config = table_config("810m", "model.num_layers=2", "model.scan_layers=False", "model.remat=none",
                          "sl_train.batch_size=4")
    report = aot.run_aot(config, "v5p:2x2x1", "sft", {"data": 1, "fsdp": 4, "tensor": 1},
                         micro_batch_per_shard=0)
    phase = report.phases[0]
    xla_total = phase.cost_analysis_flops * report.chips  # cost analysis is per device
    return {"analytic": phase.model_flops, "xla_cost_analysis_all_devices": xla_total,
            "ratio": xla_total / phase.model_flops}


def ruled_out(results: dict, size: str, kind: str, fit: dict) -> str:
    """How the next smaller slice was excluded: by a compile or by the estimate."""
    index = tpu_specs.V5P_TOPOLOGIES.index(fit["topology"].split(":")[1])
    if index == 0:
        return "smallest slice"
    smaller = f"v5p:{tpu_specs.V5P_TOPOLOGIES[index - 1]}"
    tried = results.get(f"{size}/{kind}/{smaller}")
    name = tpu_specs.slice_name(smaller)
    if tried is None:
        return f"{name} not tried"
    if tried["status"] == "estimate":
        return f"{name}: estimate {tried['needed_gib']:.0f} GiB"
    return f"{name}: compiled, needs {tried['needed_gib']:.0f} GiB"


def markdown(results: dict, sizes, kinds) -> str:
    rows = ["| model | step | smallest v5p slice | mesh fsdp x tensor | per-chip peak GiB | "
            "headroom GiB | resident GiB | grad accum | model FLOPs / step | step at 100% MFU | "
            "next smaller slice |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for kind in kinds:
            fit = results.get(f"best/{size}/{kind}")
            if not fit or fit["status"] != "fits":
                status = fit["status"] if fit else "not run yet"
                rows.append(f"| {size} | {kind} | {status} | | | | | | | | |")
                continue
            mesh = fit["mesh"]
            rows.append(
                f"| {size} | {kind} | {fit['slice']} ({fit['topology'].split(':')[1]}, {fit['chips']} chips) | "
                f"{mesh['fsdp']} x {mesh['tensor']} | {fit['peak_gib']:.1f} | {fit['headroom_gib']:.1f} | "
                f"{fit['resident_gib']:.1f} | {fit['grad_accum_steps']} | {fit['model_flops']:.2e} | "
                f"{fit['step_seconds_at_peak']:.2f} s | {ruled_out(results, size, kind, fit)} |")
    return "\n".join(rows)


def load_all(directory: str) -> dict:
    """Merges every scaling_table*.json in `directory` (one per worker process)."""
    merged = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.startswith("scaling_table") and name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                merged.update(json.load(f))
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(PAPER_SIZES))
    parser.add_argument("--kinds", default=",".join(aot_steps.STEP_KINDS))
    parser.add_argument("--results", default=RESULTS,
                        help="this run's results; parallel runs use different files in one directory")
    parser.add_argument("--min_topology", default=tpu_specs.V5P_TOPOLOGIES[0],
                        choices=tpu_specs.V5P_TOPOLOGIES,
                        help="start the search here (smaller slices are reported as not tried)")
    parser.add_argument("--table_only", action="store_true",
                        help="print the table from the saved results of every worker; compile nothing")
    parser.add_argument("--crosscheck", action="store_true", help="also cross-check FLOPs with XLA")
    args = parser.parse_args()
    sizes, kinds = args.sizes.split(","), args.kinds.split(",")
    if args.table_only:
        merged = load_all(os.path.dirname(args.results))
        print(markdown(merged, [s for s in sizes if any(k.startswith(f"best/{s}/") for k in merged)], kinds))
        return
    if not aot.libtpu_available():
        sys.exit(f"libtpu is not installed: {aot.INSTALL_HINT}")
    results = {}
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)

    def save():
        write_json_atomic(args.results, results)

    if args.crosscheck and "crosscheck" not in results:
        results["crosscheck"] = crosscheck_flops()
        save()
    if "crosscheck" in results:
        c = results["crosscheck"]
        print(f"FLOPs cross-check (unrolled 2-layer 810m, SFT): analytic {c['analytic']:.4e}, "
              f"XLA cost analysis {c['xla_cost_analysis_all_devices']:.4e} (ratio {c['ratio']:.3f})")
    for size in sizes:
        for kind in kinds:
            print(f"{size} {kind}", flush=True)
            # A larger model never fits on a smaller slice than a smaller one did.
            known = load_all(os.path.dirname(args.results))
            known.update(results)
            start_at = tpu_specs.V5P_TOPOLOGIES.index(args.min_topology)
            for smaller in PAPER_SIZES[:PAPER_SIZES.index(size)] if size in PAPER_SIZES else []:
                fit = known.get(f"best/{smaller}/{kind}", {})
                if fit.get("status") == "fits":
                    start_at = max(start_at, tpu_specs.V5P_TOPOLOGIES.index(fit["topology"].split(":")[1]))
            results[f"best/{size}/{kind}"] = smallest_fit(size, kind, results, save, start_at)
            save()
    merged = load_all(os.path.dirname(args.results))
    merged.update(results)
    print(markdown(merged, [s for s in PAPER_SIZES if any(k.startswith(f"best/{s}/") for k in merged)],
                   kinds))


if __name__ == "__main__":
    main()
