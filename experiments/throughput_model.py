"""Where the time of one PPO iteration goes: measured on this CPU, modelled on TPU.

    python experiments/throughput_model.py            # measure on CPU, then model TPU
    python experiments/throughput_model.py --no-measure  # reuse the saved CPU numbers

One PPO iteration (rl_cai/ppo.py) is: decode answers for the rollout batch with
the sampler, one forward pass each of policy, reference and value model over
prompt+answer (rl_cai/rollout.build_rollout_scorer), the preference model's
score, then `epochs` passes of minibatch policy and value updates.

CPU: SmolLM2-135M-shaped random weights, the `ppo` section's defaults (32
rollouts, prompts up to 192 tokens, 96 new tokens, 4 epochs of minibatches of
8), each piece timed on its real compiled function (after a warm-up call that
compiles it), as wall time and as this process's CPU time: the machine is
shared, and CPU-seconds are the steadier measure under load.

TPU: every paper size on v5p-128 (where 52B PPO fits), the AOT workload (64
rollouts of 2048 tokens, 512 of them answer): forward passes and updates from
their FLOPs at an assumed MFU; decoding from the bytes each step must read
(parameters in bfloat16 plus the KV cache) over HBM bandwidth, or its FLOPs if
that is larger.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax.tools import aot_phase, tpu_specs  # noqa: E402
from cai_jax.artifacts import write_json_atomic  # noqa: E402
from cai_jax.models.config import model_config_from_dict  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "throughput.json")
PAPER_SIZES = ("810m", "1.6b", "3.5b", "6.4b", "13b", "22b", "52b")
ASSUMED_MFU = 0.4  # training and scoring passes on TPU; a typical well-tuned figure, not measured
# This CPU when idle (design.md, measured earlier): float32 matmul ~270 GFLOP/s,
# a train step ~65% of that; decoding reads weights at ~16 GB/s per thread.
CPU_MATMUL_FLOPS = 270e9
CPU_TRAIN_EFFICIENCY = 0.65
CPU_READ_BANDWIDTH = 16e9


def _timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per call, after one warm-up call
    that compiles. On a shared machine the CPU time is the steadier number: on
    an idle one, wall time is about CPU time / (cores the computation keeps busy)."""
    jax.block_until_ready(fn())
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def measure_cpu(save=lambda partial: None) -> dict:
    """Times each piece of one PPO iteration of the default CPU run; `save` gets
    the numbers so far after each piece (a killed run keeps them)."""
    from cai_jax import sharding as shd
    from cai_jax.models.transformer import Transformer, init_params
    from cai_jax.inference import preference_scorer
    from cai_jax.rl_cai import ppo
    from cai_jax.inference.sampling import Sampler, SamplingParams
    from cai_jax.weights import tokenizer as tok_lib
    from cai_jax.weights.packaged import packaged_gguf_path

    ppo_cfg = ppo.get_default_config()
    rows, prompt_len, answer_len = ppo_cfg.rollout_batch_size, ppo_cfg.max_prompt_tokens, ppo_cfg.max_new_tokens
    minibatch, epochs = ppo_cfg.minibatch_size, ppo_cfg.epochs
    cfg = model_config_from_dict({"name": "smollm2-135m"})
    value_cfg = cfg.replace(heads=("scalar",))
    params = init_params(cfg, jax.random.key(0))
    value_params = init_params(value_cfg, jax.random.key(1))
    tokenizer = tok_lib.tokenizer_from_gguf(packaged_gguf_path("smollm2"))
    rng = np.random.default_rng(0)
    seq = prompt_len + answer_len
    tokens = rng.integers(100, 40000, (rows, seq)).astype(np.int32)
    attention = np.ones((rows, seq), np.int32)
    action = np.ones((rows, answer_len), np.float32)
    out = {"rows": rows, "prompt_len": prompt_len, "answer_len": answer_len, "minibatch": minibatch,
           "epochs": epochs, "model": "smollm2-135m", "load_average": os.getloadavg()[0]}

    # Decoding: the real sampler at two forced lengths; the difference is the
    # per-step decode time, the rest of the short run is prefill of the 32
    # prompts (most of a short run: it must not be spread over the decode
    # steps). The two runs compile to generation buckets of 16 and 32 slots;
    # after a 256-token prompt that changes a step's cache by 6%.
    sampler = Sampler(cfg, tokenizer, mesh=None, progress=False)
    prompts = [list(map(int, tokens[i, :prompt_len])) for i in range(rows)]
    timed = {}
    for n in (8, 24):
        sampling = SamplingParams(temperature=1.0, max_new_tokens=n, ignore_eos=True)
        timed[n] = _timed(lambda: sampler.generate(params, prompts, sampling,
                                                   batch_size=ppo_cfg.sample_batch_size))
    step = [(timed[24][i] - timed[8][i]) / 16 for i in (0, 1)]
    prefill = [timed[8][i] - 8 * step[i] for i in (0, 1)]
    out["decode"] = {"wall": prefill[0] + answer_len * step[0], "cpu": prefill[1] + answer_len * step[1],
                     "step_wall": step[0], "prefill_wall": prefill[0]}
    print(f"decode: {step[0] * 1e3:.0f} ms wall, {step[1] * 1e3:.0f} ms CPU per step of {rows} rows; "
          f"prefill {prefill[0]:.1f} s wall", flush=True)
    save(out)

    # Forward passes cost the same per row: time a quarter of the rows, scale up.
    part = max(1, rows // 4)
    scale = rows / part
    # The programs the ppo stage builds from the section (training/trainer.py's trainers).
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    programs = ppo.build_programs(ppo_cfg, mesh, cfg, value_cfg)
    scorer = programs.scorer
    wall, cpu = _timed(lambda: scorer(params, params, value_params, tokens[:part], attention[:part],
                                      action[:part]))
    out["rollout_scores"] = {"wall": wall * scale, "cpu": cpu * scale}
    pm_score = jax.jit(preference_scorer.make_score_fn(Transformer(value_cfg)))
    wall, cpu = _timed(lambda: pm_score(value_params, tokens[:part], attention[:part]))
    out["pm_score"] = {"wall": wall * scale, "cpu": cpu * scale}
    save(out)
    print(f"forward passes: {out['rollout_scores']} (policy+reference+value), "
          f"{out['pm_score']} (preference model)", flush=True)

    steps = programs.steps
    mb = {"tokens": tokens[:minibatch], "attention_mask": attention[:minibatch],
          "action_mask": action[:minibatch], "logp_old": np.full((minibatch, answer_len), -2.0, np.float32),
          "values_old": np.zeros((minibatch, answer_len), np.float32),
          "advantages": rng.normal(size=(minibatch, answer_len)).astype(np.float32),
          "returns": rng.normal(size=(minibatch, answer_len)).astype(np.float32)}
    state = {"policy": steps.policy.init_state(params), "value": steps.value.init_state(value_params)}

    def update(which, step_fn):
        def run():
            state[which], metrics = step_fn(state[which], mb, jax.random.key(0))
            return metrics
        return run

    updates_per_iteration = epochs * (rows // minibatch)
    for name, which, step_fn in (("policy_update", "policy", steps.policy.train_step),
                                 ("value_update", "value", steps.value.train_step)):
        wall, cpu = _timed(update(which, step_fn))
        out[name] = {"wall": wall * updates_per_iteration, "cpu": cpu * updates_per_iteration}
        save(out)
    print(f"updates ({updates_per_iteration} minibatches each): policy {out['policy_update']}, "
          f"value {out['value_update']}", flush=True)

    flops = {
        "decode": aot_phase.forward_flops(cfg, rows, 1) * answer_len + aot_phase.forward_flops(cfg, rows, prompt_len),
        "rollout_scores": 2 * aot_phase.forward_flops(cfg, rows, seq) + aot_phase.forward_flops(value_cfg, rows, seq),
        "pm_score": aot_phase.forward_flops(value_cfg, rows, seq),
        "policy_update": aot_phase.train_flops(cfg, rows, seq)[0] * epochs,
        "value_update": aot_phase.train_flops(value_cfg, rows, seq)[0] * epochs,
    }
    out["flops"] = flops
    return out


ICI_BYTES_PER_SECOND = 4800e9 / 8  # v5p inter-chip interconnect per chip (v5p documentation)


def tpu_model(size: str, workload: dict, topology: str = "v5p:4x4x4") -> dict:
    """Seconds per PPO iteration phase for a paper size on a v5p slice (v5p-128:
    the smallest slice where 52B PPO compiled within HBM, see SCALING.md)."""
    chip, _ = tpu_specs.parse_topology(topology)
    chips = tpu_specs.num_chips(topology)
    cfg = model_config_from_dict({"name": size})
    value_cfg = cfg.replace(heads=("scalar",))
    rows, seq, answer = workload["batch_size"], workload["seq_len"], workload["answer_len"]
    prompt = seq - answer
    compute = chips * chip.peak_bf16_flops * ASSUMED_MFU

    # Decoding: each step reads the policy's weights (bfloat16 copy, sharded over
    # all chips) and the KV cache so far; it is memory-bound unless the batch is large.
    weight_bytes = 2 * cfg.num_params()
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bf16
    decode = 0.0
    for step in range(answer):
        cache = kv_bytes_per_token * rows * (prompt + step)
        memory_time = (weight_bytes + cache) / (chips * chip.hbm_bandwidth)
        flop_time = aot_phase.forward_flops(cfg, rows, 1) / (chips * chip.peak_bf16_flops)
        decode += max(memory_time, flop_time)
    prefill = aot_phase.forward_flops(cfg, rows, prompt) / compute
    phases = {
        "decode": decode + prefill,
        "rollout_scores": (2 * aot_phase.forward_flops(cfg, rows, seq)
                           + aot_phase.forward_flops(value_cfg, rows, seq)) / compute,
        "pm_score": aot_phase.forward_flops(value_cfg, rows, seq) / compute,
        "policy_update": aot_phase.train_flops(cfg, rows, seq)[0] / compute,
        "value_update": aot_phase.train_flops(value_cfg, rows, seq)[0] / compute,
    }
    # If decoding kept the training layout, every step would all-gather each
    # chip's missing FSDP shards of the weights over the interconnect instead.
    fsdp = chips // 4
    gather = answer * (weight_bytes / 4) * (1 - 1 / fsdp) / ICI_BYTES_PER_SECOND
    return {"size": size, "slice": tpu_specs.slice_name(topology), "chips": chips, "phases": phases,
            "total": sum(phases.values()), "decode_if_weights_gathered_each_step": gather}


def idle_cpu_model(cpu: dict) -> dict:
    """The same iteration on an idle machine, from design.md's measured rates."""
    cfg = model_config_from_dict({"name": "smollm2-135m"})
    rate = CPU_MATMUL_FLOPS * CPU_TRAIN_EFFICIENCY
    flops = cpu["flops"]
    rows, answer = cpu["rows"], cpu["answer_len"]
    step_bytes = 4 * cfg.num_params()  # float32 weights read once per decode step
    step_flops = aot_phase.forward_flops(cfg, rows, 1)
    decode = answer * max(step_bytes / CPU_READ_BANDWIDTH, step_flops / CPU_MATMUL_FLOPS)
    decode += aot_phase.forward_flops(cfg, rows, cpu["prompt_len"]) / rate  # prefill
    return {"decode": decode, **{k: flops[k] / rate for k in
                                 ("rollout_scores", "pm_score", "policy_update", "value_update")}}


def breakdown_table(rows: list[tuple[str, dict]]) -> str:
    names = ("decode", "rollout_scores", "pm_score", "policy_update", "value_update")
    lines = ["| run | " + " | ".join(names) + " | iteration |", "|---" * (len(names) + 2) + "|"]
    for label, phases in rows:
        total = sum(phases[n] for n in names)
        cells = [f"{_fmt(phases[n])} ({100 * phases[n] / total:.0f}%)" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(total)} |")
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-measure", dest="measure", action="store_false")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    results = {}
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    if args.measure or "cpu" not in results:
        os.makedirs(os.path.dirname(args.results), exist_ok=True)

        def save(partial):
            write_json_atomic(args.results, {**results, "cpu_partial": partial})
        results["cpu"] = measure_cpu(save)
        results.pop("cpu_partial", None)
        write_json_atomic(args.results, results)
    cpu = results["cpu"]
    names = ("decode", "rollout_scores", "pm_score", "policy_update", "value_update")
    cpu_wall = {k: cpu[k]["wall"] for k in names}
    cpu_time = {k: cpu[k]["cpu"] for k in names}
    print(f"CPU (load average {cpu['load_average']:.1f} on 2 cores while measuring): GFLOP per "
          "CPU-second per phase: " + ", ".join(f"{k} {cpu['flops'][k] / cpu_time[k] / 1e9:.0f}" for k in names))

    # The PPO workload of the scaling table (experiments/scaling_table.py), from its config.
    from scaling_table import PAPER_SIZES as TABLE_SIZES, table_config
    c = table_config(TABLE_SIZES[-1]).ppo
    workload = {"batch_size": c.rollout_batch_size, "seq_len": c.max_prompt_tokens + c.max_new_tokens,
                "answer_len": c.max_new_tokens}
    shape = f"{cpu['rows']} x {cpu['prompt_len']}+{cpu['answer_len']}, {cpu['epochs']} epochs"
    rows = [(f"SmolLM2-135M, this CPU, CPU-seconds ({shape})", cpu_time),
            (f"SmolLM2-135M, this CPU, wall seconds, load average {cpu['load_average']:.1f} ({shape})",
             cpu_wall),
            (f"SmolLM2-135M, this CPU idle (modelled from design.md rates)", idle_cpu_model(cpu))]
    tpu = {}
    for size in PAPER_SIZES:
        model = tpu_model(size, workload)
        tpu[size] = model
        rows.append((f"{size}, {model['slice']} (modelled)", model["phases"]))
    results["tpu"] = tpu
    results["assumed_mfu"] = ASSUMED_MFU
    write_json_atomic(args.results, results)
    print(breakdown_table(rows))
    print("decode if the weights kept the FSDP training layout (all-gathered every step): "
          + ", ".join(f"{s} {_fmt(m['decode_if_weights_gathered_each_step'])}" for s, m in tpu.items()))


if __name__ == "__main__":
    main()
