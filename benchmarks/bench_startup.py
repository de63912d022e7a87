"""Whole-process time of `cai_jax.tools.generate` beside transformers' `generate`.

    python benchmarks/bench_startup.py                 # ~6 min on 2 cores
    python benchmarks/bench_startup.py --repeats 1 --batches 8,32,64

What a user waits for: a new process that loads SmolLM2-135M-Instruct, its
tokenizer, and samples --prompts prompts x --new_tokens tokens (the CLI's
defaults, t=0.7, plus --ignore_eos so both sides produce the same number of
tokens). Timed from outside, as processes, in one run:

  ours cold    empty cache folder ($CAI_JAX_CACHE): GGUF dequantized, tokenizer
               built from its metadata, every program compiled
  ours warm    the same command again: converted weights, tokenizer and
               compiled programs come from the cache folder
  ours off     CAI_JAX_COMPILATION_CACHE=0 CAI_JAX_WEIGHTS_CACHE=0 (tokenizer
               cache warm): what every process paid before these caches
  transformers the same weights as an HF safetensors folder (written once,
               outside the timing), AutoModelForCausalLM + generate, all
               prompts in one batch, torch on 2 threads
  first token  the same commands with 1 new token (ours run once before, so
               that its programs are cached): how soon a process has a token

Runs alternate ours and theirs so machine drift hits both alike; the median
of --repeats counts.

    python benchmarks/bench_startup.py --pipeline configs/tiny.py

times instead a whole pipeline run (`python -m cai_jax.main`) with the
compilation cache off, on but empty, and warm, and counts the programs each
run loaded from the cache: hits in the empty-cache run are programs one stage
compiled and a later stage needed again.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

_HF_CHILD = r"""
import sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
directory, prompts_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = [l.rstrip("\n") for l in open(prompts_file, encoding="utf-8") if l.strip()]
tok = AutoTokenizer.from_pretrained(directory)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
torch.manual_seed(0)
with torch.inference_mode():
    out = model.generate(**batch, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
for t in texts:
    print(t)
print(f"generated {out.shape[0]} x {out.shape[1] - batch['input_ids'].shape[1]}", file=sys.stderr)
"""


# cai_jax.main with JAX's cache counters printed at exit.
_PIPELINE_CHILD = r"""
import atexit, collections, json, runpy, sys
from jax import monitoring
counts = collections.Counter()
monitoring.register_event_listener(lambda event, **kw: counts.update([event.rsplit("/", 1)[-1]]))
def saved(event, secs, **kw):
    if event.endswith("compile_time_saved_sec"):
        counts["saved_secs"] += secs
    if event.endswith("backend_compile_duration"):  # each XLA program, compiled or loaded from the cache
        counts["compiles"] += 1
        counts["compile_secs"] += secs
monitoring.register_event_duration_secs_listener(saved)
atexit.register(lambda: print("CACHE_COUNTS " + json.dumps(counts), file=sys.stderr))
sys.argv = ["cai_jax.main"] + sys.argv[1:]
runpy.run_module("cai_jax.main", run_name="__main__")
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each command; the median counts")
    p.add_argument("--batches", default="",
                   help="also time warm runs of ours at these --batch_size values (comma-separated)")
    p.add_argument("--skip_off", action="store_true", help="no run with the caches switched off")
    p.add_argument("--pipeline", metavar="CONFIG",
                   help="time `python -m cai_jax.main --config=CONFIG` instead (see above)")
    p.add_argument("--pipeline_runs", default="off,empty,warm",
                   help="which pipeline runs: off, empty and/or warm (warm needs empty)")
    return p.parse_args()


def write_prompts(path: str, n: int) -> None:
    from cai_jax.data.prompt_sets import embedded_prompts

    prompts = [p.text for p in embedded_prompts("helpful")][:n]
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} embedded helpful prompts; ask for --prompts {len(prompts)} or fewer")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(" ".join(p.split()) + "\n" for p in prompts)  # one line each


def write_hf_copy(directory: str) -> None:
    from cai_jax.weights.hf import write_hf_dir
    from cai_jax.weights.loader import load_model

    loaded = load_model("smollm2", to_device=False)
    write_hf_dir(directory, loaded.config, loaded.params, loaded.tokenizer)


CPU_SECONDS: dict[str, list[float]] = {}  # user + sys of each timed child, by the name it was added under


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict, keep_stderr: bool = False):
    """Wall seconds of one child process (its CPU seconds go to timed.last_cpu)."""
    cpu, start = _children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    timed.last_cpu = _children_cpu() - cpu
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return (seconds, out.stderr) if keep_stderr else seconds


def bench_pipeline(config: str, repeats: int, base_env: dict, work: str, runs: list[str]) -> None:
    import json

    print(f"# python -m cai_jax.main --config={config}, whole process, {repeats} repeat(s)\n")
    print("| compilation cache | wall s | CPU s | XLA programs | compiled | loaded from cache "
          "| s compiling or loading | compile s saved |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cache = os.path.join(work, "pipeline_cache")
    # Tokenizer and converted weights in place first, so that the runs differ in compilation only.
    timed([sys.executable, "-c", "from cai_jax.weights.loader import load_model; "
                                 "load_model('smollm2', to_device=False)"], dict(base_env, CAI_JAX_CACHE=cache))
    for r in range(repeats):
        programs = os.path.join(work, f"jax_cache{r}")  # empty for each repeat's first cached run
        for name, extra in (("off", {"CAI_JAX_COMPILATION_CACHE": "0"}), ("on, empty", {}), ("on, warm", {})):
            if name.split()[-1] not in runs:
                continue
            env = dict(base_env, CAI_JAX_CACHE=cache, JAX_COMPILATION_CACHE_DIR=programs, **extra)
            run_dir = os.path.join(work, f"run{r}-{name.replace(', ', '-')}")
            seconds, err = timed([sys.executable, "-c", _PIPELINE_CHILD, f"--config={config}",
                                  f"--workdir={run_dir}", "--noprogress"], env, keep_stderr=True)
            line = [ln for ln in err.splitlines() if ln.startswith("CACHE_COUNTS ")][-1]
            c = json.loads(line.split(" ", 1)[1])
            n, hits = c.get("compiles", 0), c.get("cache_hits", 0)
            print(f"| {name} | {seconds:.1f} | {timed.last_cpu:.1f} | {n} | {n - hits} | {hits} "
                  f"| {c.get('compile_secs', 0.0):.1f} | {c.get('saved_secs', 0.0):.1f} |", flush=True)
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores)")


def ours_cmd(prompts_file: str, new_tokens: int, batch: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "cai_jax.tools.generate", "--prompts_file", prompts_file,
           "--max_new_tokens", str(new_tokens), "--ignore_eos", "--no_progress"]
    return cmd + (["--batch_size", str(batch)] if batch else [])


def main():
    args = parse_args()
    work = tempfile.mkdtemp(prefix="bench_startup-")
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                             "CAI_JAX_COMPILATION_CACHE", "CAI_JAX_WEIGHTS_CACHE")}
    base_env["JAX_PLATFORMS"] = "cpu"
    prompts_file, hf_dir = os.path.join(work, "prompts.txt"), os.path.join(work, "hf")
    if args.pipeline:
        try:
            bench_pipeline(args.pipeline, args.repeats, base_env, work, args.pipeline_runs.split(","))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    write_prompts(prompts_file, args.prompts)
    write_hf_copy(hf_dir)
    hf = lambda n: [sys.executable, "-c", _HF_CHILD, hf_dir, prompts_file, str(n)]  # noqa: E731
    times: dict[str, list[float]] = {}

    def add(name, seconds):
        times.setdefault(name, []).append(seconds)
        CPU_SECONDS.setdefault(name, []).append(timed.last_cpu)

    try:
        for r in range(args.repeats):
            cache = os.path.join(work, f"cache{r}")  # a new, empty cache folder per repeat
            env = dict(base_env, CAI_JAX_CACHE=cache)
            add("ours cold", timed(ours_cmd(prompts_file, args.new_tokens), env))
            add("transformers", timed(hf(args.new_tokens), base_env))
            add("ours warm", timed(ours_cmd(prompts_file, args.new_tokens), env))
            if not args.skip_off:
                off = dict(env, CAI_JAX_COMPILATION_CACHE="0", CAI_JAX_WEIGHTS_CACHE="0")
                add("ours off", timed(ours_cmd(prompts_file, args.new_tokens), off))
            add("transformers first token", timed(hf(1), base_env))
            timed(ours_cmd(prompts_file, 1), env)  # a 1-token run compiles its own programs once
            add("ours warm first token", timed(ours_cmd(prompts_file, 1), env))
            for b in filter(None, args.batches.split(",")):
                timed(ours_cmd(prompts_file, args.new_tokens, int(b)), env)  # fills the cache for b
                add(f"ours warm batch {b}", timed(ours_cmd(prompts_file, args.new_tokens, int(b)), env))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(times, args)


def report(times: dict[str, list[float]], args) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# SmolLM2-135M-Instruct, {args.prompts} prompts x {args.new_tokens} new tokens, whole process, "
          f"median of {args.repeats} (runs: min-max)\n")
    print("| command | wall s | runs | transformers / this | CPU s (user+sys) |")
    print("|---|---:|---|---:|---:|")
    for name, m in med.items():
        peer = med["transformers first token"] if "first token" in name else med["transformers"]
        span = f"{min(times[name]):.1f}-{max(times[name]):.1f}"
        print(f"| {name} | {m:.1f} | {span} | {peer / m:.2f}x | {statistics.median(CPU_SECONDS[name]):.1f} |")
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores)")


if __name__ == "__main__":
    main()
