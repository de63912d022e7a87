"""Peak host memory per process when loading a model onto a mesh shard by shard.

    python experiments/load_by_shard.py --src hf:/tmp/q15-hf [--mesh fsdp=8] \\
        [--layouts 1x8,2x4] [--check_logits]

For each layout PxD it starts P processes with D CPU devices each (P > 1:
`jax.distributed` over 127.0.0.1), builds the mesh over all P*D devices and
calls `load_model(src, mesh=mesh)`. Each process prints its peak resident
memory (ru_maxrss, which counts mapped file pages too), what it held before
loading (Python, JAX), the bytes of the shards its devices hold and the load
time. Layouts run one after another, so their peaks do not add up.

The mesh must split the weights across processes for each to hold less: with
`fsdp=8` every parameter with an embed axis is cut in 8 along it, and with 2
processes each holds 4 of the 8 pieces. (A data axis over the processes would
give every process the whole model.)

--check_logits first loads the model as before loading by shard, in a process
of its own with all devices (the whole model on the host, then placed on the
same mesh leaf by leaf), and computes logits for a fixed batch; process 0 of
each layout computes them with its shard-by-shard parameters and prints the
largest difference (0: the same weights, and the same program).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

TOKENS_SHAPE = (2, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _logits(cfg, params, mesh):
    """Logits of a fixed batch, gathered to every process as NumPy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cai_jax.models.transformer import Transformer, positions_from_mask

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, TOKENS_SHAPE).astype(np.int32)
    mask = np.ones(TOKENS_SHAPE, np.int32)

    def forward(p):
        out, _ = Transformer(cfg).apply({"params": p}, jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)),
                                        jnp.asarray(mask))
        return out["logits"]

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out = jax.jit(forward, out_shardings=replicated)(params)
    return np.asarray(out.addressable_data(0))


def _place_consuming(params: dict, shardings: dict) -> dict:
    """Host arrays onto their shardings one at a time, each host array dropped once placed."""
    import jax

    out = {}
    for key in list(params):
        value = params.pop(key)
        out[key] = (_place_consuming(value, shardings[key]) if isinstance(value, dict)
                    else jax.device_put(value, shardings[key]).block_until_ready())
        del value
    return out


def worker(args) -> None:
    """One process of a layout (or the unsharded reference): load, report, maybe compare."""
    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    jax.numpy.zeros(1).block_until_ready()
    from cai_jax import sharding as shd
    from cai_jax.weights.loader import load_model

    before = _peak_gb()
    start = time.perf_counter()
    mesh = shd.make_mesh(dict(json.loads(args.mesh_json)))
    if args.reference:  # the way before loading by shard: the whole model on the host, then placed
        model = load_model(args.src, to_device=False)
        model.params = _place_consuming(model.params, shd.param_shardings(model.config, mesh))
    else:
        model = load_model(args.src, mesh=mesh)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    peak = _peak_gb()
    held = sum(s.data.nbytes for x in jax.tree.leaves(model.params) for s in x.addressable_shards)
    report = {"process": jax.process_index(), "before_gb": round(before, 2), "peak_gb": round(peak, 2),
              "held_gb": round(held / 1e9, 2), "load_s": round(seconds, 1),
              "model_gb": round(sum(x.nbytes for x in jax.tree.leaves(model.params)) / 1e9, 2)}
    if args.logits:
        logits = _logits(model.config, model.params, mesh)
        if args.reference:
            np.save(args.logits, logits)
        elif jax.process_index() == 0:
            report["logits_max_abs_diff"] = float(np.abs(logits - np.load(args.logits)).max())
    print("REPORT " + json.dumps(report), flush=True)


def _run(src: str, num_processes: int, devices: int, mesh_json: str, logits: str | None,
         reference: bool = False) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", f"--src={src}", f"--mesh_json={mesh_json}",
         f"--num_processes={num_processes}", f"--process_id={i}", f"--port={port}"]
        + ([f"--logits={logits}"] if logits else []) + (["--reference"] if reference else []),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]
    reports = []
    for proc in procs:
        output, _ = proc.communicate()
        lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"a worker failed:\n{output[-3000:]}")
        reports.append(json.loads(lines[-1][len("REPORT "):]))
    return reports


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="hf:DIR or ckpt:DIR (any load_model source)")
    p.add_argument("--mesh", default="fsdp=8", help="axis=size,...: the mesh over all devices")
    p.add_argument("--layouts", default="1x8,2x4", help="PROCESSESxDEVICES_EACH,...")
    p.add_argument("--check_logits", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mesh_json", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--num_processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    mesh_json = json.dumps({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
    logits = os.path.join(tempfile.mkdtemp(), "reference_logits.npy") if args.check_logits else None
    print(f"{args.src}, mesh {args.mesh}")
    print("| layout | process | before loading (GB) | peak (GB) | shards held (GB) | whole model (GB) | load (s) "
          "| logits max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    devices = {p * d for p, d in layouts}
    if len(devices) != 1:
        raise SystemExit(f"--layouts {args.layouts}: every layout must have the same number of devices")
    rows = []
    if logits:
        rows.append((f"whole, then placed (1x{min(devices)})",
                     _run(args.src, 1, min(devices), mesh_json, logits, reference=True)))
    for num_processes, per_process in layouts:
        rows.append((f"{num_processes}x{per_process}", _run(args.src, num_processes, per_process, mesh_json, logits)))
    for name, reports in rows:
        for r in reports:
            print(f"| {name} | {r['process']} | {r['before_gb']} | {r['peak_gb']} | {r['held_gb']} | {r['model_gb']} "
                  f"| {r['load_s']} | {r.get('logits_max_abs_diff', '')} |", flush=True)


if __name__ == "__main__":
    main()
