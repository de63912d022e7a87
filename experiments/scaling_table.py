"""The smallest v5p slice that fits each paper size and step kind, with per-chip memory, FLOPs
and (for PPO) the generation and iteration-time bounds.

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
per optimizer step (PPO: 64 rollouts of 1536 prompt + 512 answer tokens,
generated in one sampler batch, one minibatch, 4 epochs, a separate value
model) with 4 rows per batch shard per micro-step, the policy and value
computing in bfloat16 and the frozen reference and preference model stored
in bfloat16 (ppo.dtype, ppo.ref_dtype, ppo.pm_dtype). A PPO cell includes
the sampler's prefill and decode (`aot_generate`) and one iteration's bound:
generate + score + 4 x (policy + value update). Each compile of a
paper-sized model takes minutes of CPU here.

Any other config and model, on v5p and v5e (configs/pod.py's docstring
quotes this search for Qwen2.5-7B-Instruct's shapes):

    python experiments/scaling_table.py --config=configs/pod.py \\
        --override=model.source=hf:tests/fixtures/hf_configs/qwen2.5-7b-instruct \\
        --label=qwen2.5-7b-instruct --generations=v5p,v5e \\
        --kinds=sft,pm,ppo,generate:sl_generate,generate:pairs \\
        --results=experiments/results/pod_qwen2.5-7b-instruct.json

There the config's own sections set the workload (only the mesh and the
micro-batches per shard are the table's), and `generate:SECTION` is the
sampler of that stage section (`tools.aot --step=generate --section=SECTION`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for TPU needs no local accelerator

import jax  # noqa: E402

from cai_jax import sharding as shd  # noqa: E402
from cai_jax.tools import aot_phase, aot_steps, tpu_specs  # noqa: E402
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
    "ppo.rollout_batch_size=64", "ppo.minibatch_size=64", "ppo.sample_batch_size=64",
    "ppo.max_prompt_tokens=1536", "ppo.max_new_tokens=512", "ppo.epochs=4", "ppo.share_trunk=False",
    "ppo.dtype=bfloat16", "ppo.ref_dtype=bfloat16", "ppo.pm_dtype=bfloat16",
)
MICRO_BATCH_PER_SHARD = 4  # tools.aot --micro_batch_per_shard: sets each section's grad_accum_steps
TENSOR = 4
GIB = 2 ** 30


@functools.lru_cache(maxsize=None)
def table_config(size: str, *extra: str):
    """configs/default.py with the table's overrides for model size `size`."""
    return load_config(CONFIG, [f"model.name={size}", *TABLE_OVERRIDES, *extra])


@dataclasses.dataclass(frozen=True)
class Search:
    """What is searched: the paper sizes under the table's config (the
    default), or one model (`label`) under a config file of its own."""

    config_path: Optional[str] = None  # None: table_config(size)
    overrides: tuple = ()
    generations: tuple = ("v5p",)

    def config(self, label: str):
        if self.config_path is None:
            return table_config(label)
        return _own_config(self.config_path, self.overrides)


@functools.lru_cache(maxsize=None)
def _own_config(path: str, overrides: tuple):
    return load_config(path, list(overrides))


def split_kind(kind: str) -> tuple[str, str]:
    """"generate:pairs" -> ("generate", "pairs"); "sft" -> ("sft", "ppo")."""
    step, _, section = kind.partition(":")
    return step, section or "ppo"


def best_key(label: str, kind: str, generation: str) -> str:
    # v5p keeps the key the table has always used.
    return f"best/{label}/{kind}" + ("" if generation == "v5p" else f"/{generation}")


def default_mesh(chips: int) -> dict:
    tensor = TENSOR if chips % TENSOR == 0 else 1
    return {"data": 1, "fsdp": chips // tensor, "tensor": tensor}


def summary(report: aot.AotReport) -> dict:
    out = {"status": "fits", "topology": report.topology, "slice": report.slice_name,
           "chips": report.chips, "mesh": report.mesh, "peak_gib": report.peak_bytes / GIB,
           "headroom_gib": (report.hbm_bytes - report.peak_bytes) / GIB,
           "resident_gib": sum(report.resident_bytes.values()) / GIB,
           "model_flops": report.model_flops, "hardware_flops": report.hardware_flops,
           "step_seconds_at_peak": report.step_seconds_at_peak,
           "grad_accum_steps": report.grad_accum_steps,
           "compile_seconds": sum(p.compile_seconds for p in report.phases),
           "phases": {p.name: p.total_bytes / GIB for p in report.phases},
           "report": report.to_dict()}
    if report.generation is not None:
        g = report.generation
        out["generate"] = {"seconds": g.seconds, "prefill_seconds": g.prefill_seconds,
                           "decode_step_seconds": g.decode_step_seconds, "tokens_per_second": g.tokens_per_second,
                           "cache_gib": g.cache_bytes / GIB, "decode_step_gib": g.decode_step_bytes / GIB}
    if report.iteration_seconds is not None:
        out["iteration_seconds"] = report.iteration_seconds
    return out


def trained_state_bytes(phases: aot_phase.Phases) -> int:
    """Per-chip bytes of the largest state a phase trains (its gradients and
    optimizer update make most of the temporaries); 0 for generation alone."""
    held = {k: aot_phase.bytes_per_chip(v) for k, v in phases.resident.items()}
    if "train_state" in held:
        return held["train_state"]
    return max([held.get(f"{m}_params", 0) + held.get(f"{m}_opt_state", 0) for m in ("policy", "value")
                if f"{m}_opt_state" in held] or [0])


def estimated_bytes(config, kind: str, topology: str) -> float:
    """A cheap lower estimate of the per-chip peak, to skip slices without compiling.

    Compiles needed 2.8x (13B SFT, 8 chips) to 3.7x (52B SFT, 32 chips) the
    train state per chip: the state, plus gradients and optimizer-update
    temporaries. Counting 1.5x on top (2.5x in all) stays below every compile
    seen, so a slice it rules out is very unlikely to fit. (The first table run
    counted 2x; its "estimate" rows say so in experiments/SCALING.md.)
    """
    devices = aot.topology_devices(topology)
    mesh = shd.make_mesh(default_mesh(len(devices)), devices)
    step, section = split_kind(kind)
    phases = aot_steps.build_phases(step, config, mesh, MICRO_BATCH_PER_SHARD, section)
    resident = sum(aot_phase.bytes_per_chip(v) for v in phases.resident.values())
    return resident + 1.5 * trained_state_bytes(phases)


def smallest_fit(label: str, kind: str, results: dict, save, start_at: int = 0,
                 search: Search = Search(), generation: str = "v5p") -> dict:
    """Tries `generation`'s topologies from `start_at` up; records every attempt in `results`.

    A slice is skipped without compiling when the estimate already exceeds a
    chip's HBM (status "estimate"); the first one that compiles within HBM wins.
    """
    config = search.config(label)
    step, section = split_kind(kind)
    for topo in tpu_specs.TOPOLOGIES[generation][start_at:]:
        topology = f"{generation}:{topo}"
        key = f"{label}/{kind}/{topology}"
        if key not in results:
            chips = tpu_specs.num_chips(topology)
            hbm = tpu_specs.CHIPS[generation].hbm_bytes
            start = time.time()
            try:
                estimate = estimated_bytes(config, kind, topology)
            except ValueError as e:  # the batch does not divide over this slice, say
                estimate, results[key] = None, {"status": "config error", "message": str(e)}
            if estimate is None:
                pass
            elif estimate > hbm:
                results[key] = {"status": "estimate", "needed_gib": estimate / GIB,
                                "message": f"estimated at least {estimate / GIB:.1f} GiB per chip"}
            else:
                try:
                    report = aot.run_aot(config, topology, step, default_mesh(chips),
                                         micro_batch_per_shard=MICRO_BATCH_PER_SHARD, section=section,
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
    return {"status": f"does not fit on any single {generation} slice"}


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


def ruled_out(results: dict, label: str, kind: str, fit: dict) -> str:
    """How the next smaller slice was excluded: by a compile or by the estimate."""
    generation, topo = fit["topology"].split(":")
    topologies = tpu_specs.TOPOLOGIES[generation]
    index = topologies.index(topo)
    if index == 0:
        return "smallest slice"
    smaller = f"{generation}:{topologies[index - 1]}"
    tried = results.get(f"{label}/{kind}/{smaller}")
    name = tpu_specs.slice_name(smaller)
    if tried is None:
        return f"{name} not tried"
    if tried["status"] == "estimate":
        return f"{name}: estimate {tried['needed_gib']:.0f} GiB"
    if tried["status"] == "config error":
        return f"{name}: {tried['message']}"
    return f"{name}: compiled, needs {tried['needed_gib']:.0f} GiB"


def _seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 0.1 else f"{t * 1e3:.1f} ms"


def markdown(results: dict, labels, kinds, generation: str = "v5p") -> str:
    """The table; PPO rows add the rollout's generation (prefill + decode at
    their bounds) and one iteration (generate + score + update)."""
    rows = [f"| model | step | smallest {generation} slice | mesh fsdp x tensor | per-chip peak GiB | "
            "headroom GiB | resident GiB | grad accum | model FLOPs / step | step at 100% MFU | "
            "generate at bounds | PPO iteration at bounds | next smaller slice |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        for kind in kinds:
            fit = results.get(best_key(label, kind, generation))
            if not fit or fit["status"] != "fits":
                status = fit["status"] if fit else "not run yet"
                rows.append(f"| {label} | {kind} | {status} |" + " |" * 10)
                continue
            mesh = fit["mesh"]
            # Generation alone has no FLOP-bound step: its time is the generate column.
            flops = f"{fit['model_flops']:.2e}" if fit["model_flops"] else ""
            step = _seconds(fit["step_seconds_at_peak"]) if fit["model_flops"] else ""
            generate = (f"{_seconds(fit['generate']['seconds'])} ({fit['generate']['tokens_per_second']:,.0f} "
                        "tokens/s)" if "generate" in fit else "")
            t = fit.get("iteration_seconds")
            iteration = (f"{_seconds(t['total'])} (generate {_seconds(t['generate'])}, score "
                         f"{_seconds(t['score'])}, update {_seconds(t['update'])})" if t else "")
            rows.append(
                f"| {label} | {kind} | {fit['slice']} ({fit['topology'].split(':')[1]}, {fit['chips']} chips) | "
                f"{mesh['fsdp']} x {mesh['tensor']} | {fit['peak_gib']:.1f} | {fit['headroom_gib']:.1f} | "
                f"{fit['resident_gib']:.1f} | {fit['grad_accum_steps']} | {flops} | "
                f"{step} | {generate} | {iteration} | {ruled_out(results, label, kind, fit)} |")
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
    parser.add_argument("--kinds", default="sft,pm,ppo",
                        help="steps: sft, pm, ppo, score, generate:SECTION (ppo, sl_generate, pairs)")
    parser.add_argument("--results", default=RESULTS,
                        help="this run's results; parallel runs use different files in one directory")
    parser.add_argument("--min_topology", default=None,
                        help="start the search here (smaller slices are reported as not tried)")
    parser.add_argument("--config", default=None,
                        help="search one model under this config file instead of the paper sizes")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="with --config: a config override, e.g. model.source=hf:DIR (repeatable)")
    parser.add_argument("--label", default=None, help="with --config: the model's name in the results")
    parser.add_argument("--generations", default="v5p", help="TPU generations to search, e.g. v5p,v5e")
    parser.add_argument("--table_only", action="store_true",
                        help="print the table from the saved results of every worker; compile nothing")
    parser.add_argument("--crosscheck", action="store_true", help="also cross-check FLOPs with XLA")
    args = parser.parse_args()
    kinds, generations = args.kinds.split(","), args.generations.split(",")
    own = args.config is not None
    if own and not args.label:
        parser.error("--config needs --label (the model's name in the results)")
    search = Search(args.config, tuple(args.override), tuple(generations))
    labels = [args.label] if own else args.sizes.split(",")

    def merged_results() -> dict:
        # The paper table merges parallel workers' files; a model of one's own has one file.
        known = {} if own else load_all(os.path.dirname(args.results))
        known.update(results)
        return known

    results = {}
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    if args.table_only:
        for generation in generations:
            print(markdown(merged_results(), [s for s in labels if any(k.startswith(f"best/{s}/") for k in
                                                                       merged_results())], kinds, generation))
        return
    if not aot.libtpu_available():
        sys.exit(f"libtpu is not installed: {aot.INSTALL_HINT}")
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)

    def save():
        write_json_atomic(args.results, results)

    if args.crosscheck and "crosscheck" not in results:
        results["crosscheck"] = crosscheck_flops()
        save()
    if "crosscheck" in results:
        c = results["crosscheck"]
        print(f"FLOPs cross-check (unrolled 2-layer 810m, SFT): analytic {c['analytic']:.4e}, "
              f"XLA cost analysis {c['xla_cost_analysis_all_devices']:.4e} (ratio {c['ratio']:.3f})")
    for generation in generations:
        topologies = tpu_specs.TOPOLOGIES[generation]
        for label in labels:
            for kind in kinds:
                print(f"{label} {kind} {generation}", flush=True)
                start_at = topologies.index(args.min_topology) if args.min_topology else 0
                # A larger model never fits on a smaller slice than a smaller one did.
                known = merged_results()
                for smaller in PAPER_SIZES[:PAPER_SIZES.index(label)] if label in PAPER_SIZES and not own else []:
                    fit = known.get(best_key(smaller, kind, generation), {})
                    if fit.get("status") == "fits":
                        start_at = max(start_at, topologies.index(fit["topology"].split(":")[1]))
                results[best_key(label, kind, generation)] = smallest_fit(label, kind, results, save, start_at,
                                                                          search, generation)
                save()
    known = merged_results()
    for generation in generations:
        print(markdown(known, [s for s in labels if any(k.startswith(f"best/{s}/") for k in known)], kinds,
                       generation))


if __name__ == "__main__":
    main()
