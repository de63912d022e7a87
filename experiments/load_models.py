"""Load time and peak memory of each packaged model, each in a new process.

    python experiments/load_models.py [--models smollm2,qwen2.5-coder-0.5b-instruct]

For every model it runs `load_model(name)` in a fresh Python process (weights
placed on the device, tokenizer built) and prints the wall time of that call,
the process's peak resident memory, what it held before loading (Python, JAX)
and the size of the float32 weights. The
first load of a split model also joins its parts into the cache; run the script
twice to see the steady state, which is what the README's table reports.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, numpy as np
jax.numpy.zeros(1).block_until_ready()
from cai_jax.weights.loader import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
model = load_model(sys.argv[1])
jax.block_until_ready(model.params)
seconds = time.perf_counter() - start
weights = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(model.params))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"model": sys.argv[1], "load_s": round(seconds, 1), "peak_gb": round(peak / 1e9, 2),
                  "before_gb": round(before / 1e9, 2), "float32_weights_gb": round(weights / 1e9, 2),
                  "load_peak_over_weights": round((peak - before) / weights, 2)}))
"""


def measure(name: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, name], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loading {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from cai_jax.weights.packaged import PACKAGED_MODELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(PACKAGED_MODELS))
    args = p.parse_args()
    print("| model | load (s) | peak resident (GB) | before loading (GB) | float32 weights (GB) "
          "| (peak - before) / weights |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        r = measure(name)
        print(f"| {name} | {r['load_s']} | {r['peak_gb']} | {r['before_gb']} | {r['float32_weights_gb']} "
              f"| {r['load_peak_over_weights']} |", flush=True)


if __name__ == "__main__":
    main()
