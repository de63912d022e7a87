"""Compiles a run's real train steps for a TPU topology on this CPU machine, ahead of time.

    python -m cai_jax.tools.aot --config=configs/default.py --config.model.name=52b \\
        --config.model.dtype=bfloat16 --config.model.remat=full \\
        --config.sl_train.batch_size=64 --config.sl_train.max_seq_len=2048 \\
        --topology=v5p:4x4x4 --step=sft --mesh fsdp=16,tensor=4 --micro_batch_per_shard=4

    python -m cai_jax.tools.aot --config=configs/default.py --config.model.name=52b \\
        --config.model.dtype=bfloat16 --config.model.remat=full \\
        --config.mesh.fsdp=16 --config.mesh.tensor=4 --topology=v5p:4x4x4 --step=generate

The steps are the ones the run's stages build from the same config
(`cai_jax.tools.aot_steps`): the stage section gives the batch, lengths, gradient
accumulation and optimizer (sl_train, pm_train, ppo), and for PPO also the
models' dtypes (ppo.dtype, ref_dtype, pm_dtype) and share_trunk; override
them with --config.<section>.<field> as for a run. --step=generate compiles
the sampler's prefill and decode for the section that generates (--section:
ppo, sl_generate, pairs; `aot_generate`), and --step=ppo compiles them with
the rest of an iteration. --config.model.source=hf:DIR takes the model's
shapes from DIR/config.json alone (`aot_model`). It builds the mesh over
the topology's devices (`jax.experimental.topologies`, needs libtpu from the
`tpu` extra), lowers and compiles the step kind's phases with abstract
inputs, and prints per-chip memory
from the compiler (arguments, outputs, temporaries; plus state that stays
resident between phases), the analytic FLOPs, and the step time at the chip's
peak FLOP/s; for generation the prefill and decode-step bounds and the
slice's tokens per second, and for PPO one iteration's bound (generate +
score + update). A config that does not fit ends with "does not fit: needs X GiB
per chip, v5p has 95 GiB" and exit code 2, not a traceback.

Each compile of a paper-sized model takes one to several minutes of CPU.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import time
from typing import Mapping, Optional

if __name__ == "__main__":
    # Compiling for a topology needs no local accelerator: do not probe for one.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cai_jax import sharding as shd
from cai_jax.tools import aot_generate, aot_phase, aot_steps, tpu_specs

GIB = 2 ** 30
INSTALL_HINT = 'pip install "jax[tpu]==0.10.2"'


class DoesNotFit(Exception):
    """The step needs more HBM per chip than the topology's chips have."""

    def __init__(self, needed_bytes: float, chip: tpu_specs.ChipSpec, detail: str):
        self.needed_bytes, self.chip, self.detail = needed_bytes, chip, detail
        super().__init__(f"does not fit: needs {needed_bytes / GIB:.1f} GiB per chip, "
                         f"{chip.generation} has {chip.hbm_bytes / GIB:.0f} GiB ({detail})")


class AotConfigError(ValueError):
    """The mesh, batch or topology cannot be used (e.g. the mesh does not divide)."""


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology, usable for compiling but not running."""
    tpu_specs.parse_topology(topology)  # a clear error before libtpu sees the name
    if not libtpu_available():
        raise AotConfigError(f"libtpu is not installed; ahead-of-time TPU compiles need it: {INSTALL_HINT}")
    # libtpu takes a machine-wide lock by default; compiling needs no chip, so
    # let several processes (tests, other tools) load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu's own message names the problem
        raise AotConfigError(f"--topology {topology!r}: libtpu cannot build it: {e}") from e


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=16,tensor=4" -> {"data": 1, "fsdp": 16, "tensor": 4} (unnamed axes are 1)."""
    sizes = {axis: 1 for axis in shd.MESH_AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, value = part.partition("=")
        if not sep or axis not in shd.MESH_AXES:
            raise AotConfigError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes {shd.MESH_AXES}")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise AotConfigError(f"--mesh {text!r}: size of {axis} is not an integer") from None
    return sizes


# Out-of-memory reports of the TPU compiler (libtpu 0.0.42), e.g.
# "Ran out of memory on HBM, the total memory required for HLO temporaries
# (148.42G) exceeds available HBM (95.74G)." and, from other passes,
# "Ran out of memory in memory space hbm. Used 143.27G of 95.74G hbm."
_OOM_TEMPS = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                        r"\(([\d.]+)([KMGT]?)\)")
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_oom(message: str) -> Optional[tuple[str, float, float]]:
    """("temporaries" | "used", bytes, capacity bytes) from a TPU compiler
    out-of-memory error, or None if the message is not one."""
    for kind, pattern in (("temporaries", _OOM_TEMPS), ("used", _OOM_USED)):
        match = pattern.search(message)
        if match:
            return (kind, float(match.group(1)) * _UNITS[match.group(2)],
                    float(match.group(3)) * _UNITS[match.group(4)])
    return None


@dataclasses.dataclass
class PhaseReport:
    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    other_resident_bytes: int  # resident state this phase does not take as an argument
    compile_seconds: float
    cost_analysis_flops: Optional[float]  # XLA's count, per device; a scan body counted once
    model_flops: float
    hardware_flops: float
    generation: bool = False  # the sampler's prefill or decode (see GenerationReport)
    loop_collective_bytes: Optional[int] = None  # per iteration of its compiled loop, per chip

    @property
    def total_bytes(self) -> int:
        # Donated inputs share their buffers with the outputs (alias), so count them once.
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.other_resident_bytes)


@dataclasses.dataclass
class AotReport:
    kind: str
    model: str
    num_params: int
    topology: str
    slice_name: str
    chips: int
    mesh: dict
    hbm_bytes: int
    peak_flops_per_chip: float
    dtype: str
    param_dtype: str
    remat: str
    workload: dict
    grad_accum_steps: int
    tokens_per_step: int
    resident_bytes: dict
    phases: list
    generation: Optional[aot_generate.GenerationReport] = None
    notes: tuple = ()  # what the compile cannot show (aot_model)

    @property
    def peak_bytes(self) -> int:
        return max(p.total_bytes for p in self.phases)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def model_flops(self) -> float:
        """The FLOPs of the phases bounded by compute (generation is bounded apart)."""
        return sum(p.model_flops for p in self.phases if not p.generation)

    @property
    def hardware_flops(self) -> float:
        return sum(p.hardware_flops for p in self.phases if not p.generation)

    @property
    def step_seconds_at_peak(self) -> float:
        """The MFU bound: model FLOPs at 100% of every chip's peak (for PPO: one
        minibatch update of each model and the scoring passes)."""
        return self.model_flops / (self.chips * self.peak_flops_per_chip)

    def phase_seconds(self, name: str) -> float:
        return sum(p.model_flops for p in self.phases if p.name == name) / (
            self.chips * self.peak_flops_per_chip)

    @property
    def iteration_seconds(self) -> Optional[dict]:
        """PPO: one iteration at the bounds, by part: generating the rollout,
        scoring it, and epochs x minibatches updates of each model."""
        if self.kind != "ppo" or self.generation is None:
            return None
        updates = self.workload["updates_per_iteration"] * (
            self.phase_seconds("policy_update") + self.phase_seconds("value_update"))
        parts = {"generate": self.generation.seconds,
                 "score": sum(self.phase_seconds(n) for n in aot_steps.SCORING_PHASES), "update": updates}
        return dict(parts, total=sum(parts.values()))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(peak_bytes=self.peak_bytes, fits=self.fits, model_flops=self.model_flops,
                   hardware_flops=self.hardware_flops, step_seconds_at_peak=self.step_seconds_at_peak,
                   iteration_seconds=self.iteration_seconds,
                   generation=self.generation.to_dict() if self.generation else None)
        for phase, obj in zip(out["phases"], self.phases):
            phase["total_bytes"] = obj.total_bytes
        return out

    def format(self) -> str:
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        w = self.workload
        size = (f"{self.num_params / 1e9:.2f}B" if self.num_params >= 1e9
                else f"{self.num_params / 1e6:.1f}M")
        lines = [f"{self.model} ({size} parameters) {self.kind} on {self.topology} "
                 f"({self.slice_name}, {self.chips} chips), mesh {mesh}"]
        lines += [f"note: {n}" for n in self.notes]
        if self.kind in ("sft", "pm", "ppo"):
            lines.append(f"compute {self.dtype}, params {self.param_dtype}, remat={self.remat}, "
                         f"Adam mu {w.get('mu_dtype') or self.param_dtype}; batch {w['batch_size']} x "
                         f"{w['seq_len']} tokens, gradient accumulation {self.grad_accum_steps}")
        else:
            lines.append(f"compute {self.dtype}, params {self.param_dtype}")
        if self.kind in ("ppo", "score"):
            lines.append(f"rollouts {w['rollout_batch_size']} x {w['seq_len']} tokens "
                         f"({w['answer_len']} answer); reference {w['ref_dtype']}, preference model "
                         f"{w['pm_dtype']}; " + ("policy and value on one trunk" if w["share_trunk"]
                                                 else "separate value model"))
        lines += [
            "per chip, GiB:",
            f"  {'phase':<16}{'arguments':>10}{'outputs':>9}{'aliased':>9}{'temps':>8}"
            f"{'resident*':>10}{'total':>8}{'compile':>9}",
        ]
        for p in self.phases:
            lines.append(
                f"  {p.name:<16}{p.argument_bytes / GIB:>10.2f}{p.output_bytes / GIB:>9.2f}"
                f"{p.alias_bytes / GIB:>9.2f}{p.temp_bytes / GIB:>8.2f}"
                f"{p.other_resident_bytes / GIB:>10.2f}{p.total_bytes / GIB:>8.2f}"
                f"{p.compile_seconds:>8.0f}s")
        if len(self.phases) > 1:
            lines.append("  * resident: state kept on the chip during the phase but not its argument")
        held = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.resident_bytes.items())
        lines.append(f"  resident state: {held}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"peak {self.peak_bytes / GIB:.1f} GiB of {self.hbm_bytes / GIB:.0f} GiB per chip "
                     f"({100 * self.peak_bytes / self.hbm_bytes:.0f}%): {verdict}, headroom "
                     f"{(self.hbm_bytes - self.peak_bytes) / GIB:.1f} GiB")
        if self.model_flops:
            cost = [p.cost_analysis_flops for p in self.phases
                    if p.cost_analysis_flops is not None and not p.generation]
            lines.append(f"FLOPs per step: {self.model_flops:.3e} model (analytic), "
                         f"{self.hardware_flops:.3e} with rematerialisation"
                         + (f"; XLA cost analysis {sum(cost):.3e} per device, scan bodies counted once"
                            if cost else ""))
            what = " (one minibatch update of each model + scoring)" if self.kind == "ppo" else ""
            lines.append(f"step time at 100% MFU{what}: {_seconds(self.step_seconds_at_peak)} "
                         f"({self.chips} x {self.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16), "
                         f"{self.tokens_per_step / self.step_seconds_at_peak:,.0f} tokens/s")
        if self.generation is not None:
            lines += _generation_lines(self.generation, self.chips)
        if self.iteration_seconds is not None:
            t = self.iteration_seconds
            lines.append(f"one PPO iteration at these bounds: {_seconds(t['total'])} = generate "
                         f"{_seconds(t['generate'])} + score {_seconds(t['score'])} + update "
                         f"{_seconds(t['update'])} ({w['epochs']} epochs x "
                         f"{w['updates_per_iteration'] // w['epochs']} minibatches of policy and value)")
        return "\n".join(lines)


def _generation_lines(g: aot_generate.GenerationReport, chips: int) -> list[str]:
    bounds = ", ".join(f"{k} {_seconds(v)}" for k, v in g.decode_step_bounds.items())
    moved = (f"; the compiled step moves {g.decode_step_collective_bytes / 2 ** 20:.1f} MiB per chip "
             "between chips" if g.decode_step_collective_bytes is not None else "")
    copy = " (its own copy: the sampler runs the layers unrolled)" if g.copies_weights else ""
    return [
        f"generation ({g.section}): {g.rows} prompts in {g.batches} sampler batch(es) of {g.batch_rows} rows x "
        f"{g.prompt_width}-token prompts + {g.answer_tokens} new tokens (cache {g.prompt_width + g.gen_width} "
        f"slots), temperature {g.temperature:g}",
        f"  per chip: weights {g.weight_bytes / GIB:.2f} GiB{copy}, KV cache {g.cache_bytes / GIB:.2f} GiB",
        f"  prefill: {g.prefill_flops:.3e} FLOPs, at 100% of peak {_seconds(g.prefill_seconds)}",
        f"  decode step: reads {g.decode_step_bytes / GIB:.2f} GiB per chip (weights "
        f"{g.decode_step_weight_bytes / GIB:.2f} + KV cache {g.cache_bytes / GIB:.2f}), "
        f"{g.decode_step_flops:.3e} FLOPs{moved}",
        f"  decode step bound: {_seconds(g.decode_step_seconds)} (HBM, compute, interconnect: {bounds}); "
        f"{g.answer_tokens - 1} steps {_seconds(g.decode_seconds)}",
        f"  generate: {_seconds(g.batch_seconds)} per batch, {_seconds(g.seconds)} in all, "
        f"{g.tokens_per_second:,.0f} answer tokens/s on the {chips} chips",
    ]


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def _cost_flops(compiled) -> Optional[float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def compile_phases(phases: aot_phase.Phases, chip: tpu_specs.ChipSpec, progress=None) -> list[PhaseReport]:
    """Lowers and compiles every phase; raises DoesNotFit as soon as one cannot fit."""
    resident = {k: aot_phase.bytes_per_chip(v) for k, v in phases.resident.items()}
    total_resident = sum(resident.values())
    if total_resident > chip.hbm_bytes:  # no compile needed to know
        held = ", ".join(f"{k} {v / GIB:.1f}" for k, v in resident.items())
        raise DoesNotFit(total_resident, chip, f"parameters and optimizer state alone: {held} GiB")
    reports = []
    for phase in phases.phases:
        other = sum(b for k, b in resident.items() if k not in phase.uses)
        start = time.time()
        if progress:
            progress(f"compiling {phase.name} ...")
        try:
            compiled = phase.fn.lower(*phase.args, **phase.kwargs).compile()
        except Exception as e:
            oom = parse_oom(str(e))
            if oom is None:
                raise
            kind, amount, capacity = oom
            if kind == "temporaries":  # the arguments (resident state) come on top
                needed = amount + total_resident
                what = (f"{phase.name}: {amount / GIB:.1f} GiB of temporaries (the compiler sees "
                        f"{capacity / GIB:.2f} GiB of HBM) plus {total_resident / GIB:.1f} GiB of "
                        f"parameters and optimizer state")
            else:
                needed = amount + other
                what = (f"{phase.name}: the compiler used {amount / GIB:.1f} GiB of its "
                        f"{capacity / GIB:.2f} GiB, plus {other / GIB:.1f} GiB of other resident state")
            raise DoesNotFit(needed, chip, what) from None
        mem = compiled.memory_analysis()
        collectives = (aot_generate.loop_collective_bytes(compiled.as_text())
                       if phase.count_loop_collectives else None)
        report = PhaseReport(
            phase.name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
            int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), other,
            time.time() - start, _cost_flops(compiled), phase.model_flops, phase.hardware_flops,
            phase.generation, collectives)
        reports.append(report)
        if report.total_bytes > chip.hbm_bytes:
            raise DoesNotFit(report.total_bytes, chip, f"{phase.name}: arguments + outputs + "
                             f"temporaries + {other / GIB:.1f} GiB other resident state")
    return reports


def run_aot(config, topology: str, kind: str, mesh_sizes: Optional[Mapping[str, int]] = None,
            devices=None, micro_batch_per_shard: Optional[int] = None, progress=None,
            section: str = "ppo", prompt_tokens: Optional[int] = None,
            shared_prefix: bool = False) -> AotReport:
    """Compiles step `kind` as the experiment `config` runs it (model section,
    stage section; mesh sizes default to config.mesh) for `topology`; returns
    the report or raises DoesNotFit / AotConfigError. `section`,
    `prompt_tokens` and `shared_prefix`: see aot_steps.build_phases."""
    chip, _ = tpu_specs.parse_topology(topology)
    devices = devices if devices is not None else topology_devices(topology)
    try:
        mesh = (shd.make_mesh(mesh_sizes, devices) if mesh_sizes is not None
                else shd.mesh_from_config(config, devices))
    except ValueError as e:
        raise AotConfigError(f"{e} (topology {topology} has {len(devices)} chips)") from None
    try:
        phases = aot_steps.build_phases(kind, config, mesh, micro_batch_per_shard, section, prompt_tokens,
                                        shared_prefix)
    except ValueError as e:
        raise AotConfigError(str(e)) from None
    reports = compile_phases(phases, chip, progress)
    cfg = phases.model_config
    generation = None
    if phases.generation is not None:
        decode = next(r for r in reports if r.name == "decode")
        generation = aot_generate.generation_report(phases.generation, chip, len(devices),
                                                    decode.loop_collective_bytes)
    return AotReport(
        kind=kind, model=phases.model_name, num_params=cfg.num_params(),
        topology=topology, slice_name=tpu_specs.slice_name(topology), chips=len(devices),
        mesh=dict(mesh.shape), hbm_bytes=chip.hbm_bytes, peak_flops_per_chip=chip.peak_bf16_flops,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, workload=dict(phases.workload),
        grad_accum_steps=phases.grad_accum_steps, tokens_per_step=phases.tokens_per_step,
        resident_bytes={k: aot_phase.bytes_per_chip(v) for k, v in phases.resident.items()},
        phases=reports, generation=generation, notes=phases.notes)


def _main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    try:
        mesh_sizes = parse_mesh(flags.FLAGS.mesh) if flags.FLAGS.mesh else None
        report = run_aot(config, flags.FLAGS.topology, flags.FLAGS.step, mesh_sizes,
                         micro_batch_per_shard=flags.FLAGS.micro_batch_per_shard,
                         progress=lambda m: print(m, file=sys.stderr, flush=True),
                         section=flags.FLAGS.section, prompt_tokens=flags.FLAGS.prompt_tokens,
                         shared_prefix=flags.FLAGS.shared_prefix)
    except (DoesNotFit, AotConfigError) as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
    print(report.format())
    if flags.FLAGS.json_out:
        from cai_jax.artifacts import write_json_atomic
        write_json_atomic(flags.FLAGS.json_out, report.to_dict())


def main():
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/default.py",
                                    "the run's experiment config: model, mesh and the stage's section "
                                    "(sl_train, pm_train or ppo; its defaults where the config has none)")
    flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:4x4x4 (64 chips = v5p-128)")
    flags.DEFINE_enum("step", "sft", list(aot_steps.STEP_KINDS), "which step to compile")
    flags.DEFINE_string("mesh", None, "mesh axis sizes, e.g. fsdp=16,tensor=4 (default: config.mesh)")
    flags.DEFINE_enum("section", "ppo", list(aot_generate.GENERATE_SECTIONS),
                      "--step=generate: the stage section whose generation to compile")
    flags.DEFINE_integer("prompt_tokens", None,
                         "--step=generate: the longest prompt (default: the section's limit; "
                         "sl_generate has none but the model's context)")
    flags.DEFINE_bool("shared_prefix", False,
                      "--step=generate and ppo: also compile the sampler's shared-prefix layout "
                      "(sampling.shared_prefix) at its largest shape (experiments/SCALING.md)")
    flags.DEFINE_integer("micro_batch_per_shard", None,
                         "set the section's grad_accum_steps so each batch shard takes this many rows "
                         "per micro-step (0: none; default: the config's grad_accum_steps)")
    flags.DEFINE_string("json_out", None, "also write the report as JSON here")
    app.run(_main)


if __name__ == "__main__":
    main()
