"""Which way round a decode step's products run fastest on XLA:CPU.

    python benchmarks/bench_orientation.py                # rows 1, 8, 32, 128
    python benchmarks/bench_orientation.py --rows 32 --repeats 30

With SmolLM2-135M's shapes and random weights, times two pieces of a decode
step in the two orientations the sampler could use:
  - activations first: x [rows, in] @ W [in, out] (the Flax model's Dense);
  - weights first: W^T [out, in] @ x^T [in, rows] (models/feature_major.py);
for a 30-layer SwiGLU MLP chain (distinct weights per layer, so they stream
from memory as in a real step) and for the LM head ([576] -> 49152 logits).
Runs alternate between the two orientations; prints the median and the ratio.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,32,128", help="comma-separated activation rows (batch)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per orientation")
    p.add_argument("--layers", type=int, default=30)
    return p.parse_args()


def main():
    args = parse_args()
    import jax
    import jax.numpy as jnp

    d, f, vocab = 576, 1536, 49152  # SmolLM2-135M
    keys = jax.random.split(jax.random.key(0), 2 * args.layers + 1)
    gate_up = [jax.random.normal(keys[i], (d, 2 * f)) * 0.02 for i in range(args.layers)]
    down = [jax.random.normal(keys[args.layers + i], (f, d)) * 0.02 for i in range(args.layers)]
    head_dv = jax.random.normal(keys[-1], (d, vocab)) * 0.02
    weights = {
        "activations first": (gate_up, down, head_dv),
        "weights first": ([w.T.copy() for w in gate_up], [w.T.copy() for w in down], head_dv.T.copy()),
    }

    def mlp_rows(x, gate_up, down):  # x [rows, D]
        for w1, w2 in zip(gate_up, down):
            a = x @ w1
            x = x + (jax.nn.silu(a[:, :f]) * a[:, f:]) @ w2
        return x

    def mlp_columns(x, gate_up_t, down_t):  # x [D, rows]
        for w1, w2 in zip(gate_up_t, down_t):
            a = w1 @ x
            x = x + w2 @ (jax.nn.silu(a[:f]) * a[f:])
        return x

    programs = {
        "activations first": (jax.jit(mlp_rows), jax.jit(lambda x, w: jnp.max(x @ w, axis=1))),
        "weights first": (jax.jit(mlp_columns), jax.jit(lambda x, w: jnp.max(w @ x, axis=0))),
    }
    print(f"# {args.layers}-layer MLP chain and LM head, SmolLM2-135M shapes, float32; "
          f"median of {args.repeats} alternating runs; jax {jax.__version__}")
    print("| rows | piece | activations first ms | weights first ms | weights / activations |")
    print("|---:|---|---:|---:|---:|")
    for rows in [int(r) for r in args.rows.split(",")]:
        inputs = {"activations first": jnp.ones((rows, d)), "weights first": jnp.ones((d, rows))}
        for piece in ("MLP chain", "LM head"):
            calls = {}
            for name, (mlp, head) in programs.items():
                gu, dn, hw = weights[name]
                x = inputs[name]
                calls[name] = (lambda mlp=mlp, x=x, gu=gu, dn=dn: mlp(x, gu, dn)) if piece == "MLP chain" \
                    else (lambda head=head, x=x, hw=hw: head(x, hw))
                jax.block_until_ready(calls[name]())  # compile
            times = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    jax.block_until_ready(call())
                    times[name].append(time.perf_counter() - start)
            a, w = (1e3 * float(np.median(times[n])) for n in ("activations first", "weights first"))
            print(f"| {rows} | {piece} | {a:.1f} | {w:.1f} | {w / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
