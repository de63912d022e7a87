"""Shared-prefix prefill against whole prompts and against transformers'
`generate`, on the prompts the pipeline really sends.

    python benchmarks/bench_shared_prefix.py             # the three shapes (~15 min on 2 cores)
    python benchmarks/bench_shared_prefix.py --shapes=sl_critique --skip_hf

Shapes (the prompts are built by the stages' own code; SL-CAI's model
answers are canned, since only the prompts' tokens matter here):
  sl_critique    SmolLM2-135M, configs/default.py's round-1 critique requests
                 (one exemplar from the constitution, drawn per prompt), 32 prompts
  sl_revision_4  SmolLM2-135M, configs/reproduce.py's round-4 revision requests
                 (the longest transcripts of that run), 32 prompts; also "stored":
                 the round-4 critique requests sampled first with a KVStore, as
                 sl_generate does, so each revision prompt reads its critique
                 prompt's keys and values (the sampled critique is not the canned
                 one the prompt holds, so only the critique prompt is reused)
  pairs          Qwen2.5-Coder-0.5B-Instruct, configs/default.py's pairs: 64
                 red-team prompts under the better and the worse system
                 message of their framing (128 rows)

Each side runs the stage's batch size, temperature and answer length, with
every row decoding exactly that many tokens (ignore_eos here, min_new_tokens
in transformers). Prefill seconds are a one-token call; decode seconds the
full call less that. Best of --repeats after an untimed call that compiles;
the sides interleave so machine load hits them alike. "programs" counts the
prefill and decode programs our side compiled for the full-length call
(after "stored", the previous step's too).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ("sl_critique", "sl_revision_4", "pairs")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--prompts", type=int, default=0, help="prompts per shape (0: 32, pairs 64)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side; the best counts")
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--skip_hf", action="store_true", help="only our sampler, with and without sharing")
    return p.parse_args()


def config(name: str):
    from cai_jax.config import load_config_module
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config_module(os.path.join(root, "configs", f"{name}.py")).get_config()


def sl_prompts(cfg, tokenizer, max_seq_len: int, n: int, purpose: str,
               previous: str = "") -> tuple[list[list[int]], dict]:
    """The token ids sl_generate sends for `purpose` (e.g. "critique0"), built
    by the stage's own rounds with canned model text; with `previous`, the
    run also holds that step's prompts (run["previous"])."""
    from cai_jax.constitution import constitution_from_config
    from cai_jax.data.prompt_sets import load_prompts
    from cai_jax.sl_cai import generate as g

    canned = {"answer": "Sure. First find a house with no lights on, then wait until night and go in "
                        "through a back window, taking only small things.",
              "critique": "The answer helps with a burglary, which is illegal and harms the owner.",
              "revision": "I can't help with breaking into a house. If you are locked out, a "
                          "locksmith or your landlord can let you in."}
    sent: dict = {}

    def generate(prompts, max_new_tokens, step, example_ids):
        sent[step] = (prompts, max_new_tokens)
        return [canned[next(k for k in canned if step.startswith(k))]] * len(prompts)

    settings = g.StepSettings.from_config(cfg.sl_generate, cfg.sampling)
    builder = g.PromptBuilder(tokenizer, cfg.data.render, max_seq_len)
    items = load_prompts(cfg.data, "red_team", "train")[:n]
    g.revise_prompts(items, constitution_from_config(cfg.constitution, cfg.seed), builder, generate,
                     settings, num_revisions=cfg.sl_generate.num_revisions,
                     num_fewshot=cfg.sl_generate.num_fewshot, direct_revision=False, seed=cfg.seed)
    prompts, max_new = sent[purpose]
    run = {"max_new_tokens": max_new, "temperature": settings.temperature, "batch_size": settings.batch_size}
    if previous:
        run["previous"] = sent[previous]
    return prompts, run


def pairs_prompts(cfg, tokenizer, n: int) -> tuple[list[list[int]], dict]:
    from cai_jax.constitution import constitution_from_config
    from cai_jax.rl_cai import pairs
    from cai_jax.weights.tokenizer import encode_text

    framings = constitution_from_config(cfg.constitution, cfg.seed).contrastive_framings
    rows = []
    for p in pairs.pair_prompts(cfg)[:n]:
        p["construction"] = pairs.draw_construction(p, framings, cfg.seed)
        rows += [encode_text(tokenizer, t) for t in pairs.prompt_texts(p, "chat", tokenizer, framings)]
    return rows, {"max_new_tokens": cfg.pairs.max_new_tokens, "temperature": cfg.pairs.temperature,
                  "batch_size": cfg.pairs.batch_size}


def time_ours(sampler, params, prompts, run: dict, new_tokens: int, side: str) -> float:
    """One generate call; "stored" first samples the previous step (untimed) into a KVStore."""
    from cai_jax.inference.kv_store import KVStore
    from cai_jax.inference.sampling import SamplingParams
    sp = SamplingParams(temperature=run["temperature"], max_new_tokens=new_tokens, ignore_eos=True)
    ids = list(range(len(prompts)))
    store = None
    if side == "stored":
        store = KVStore()
        previous, previous_new = run["previous"]
        sampler.generate(params, previous, SamplingParams(temperature=run["temperature"],
                                                          max_new_tokens=previous_new),
                         example_ids=ids, batch_size=run["batch_size"], shared_prefix=True, kv_store=store)
    start = time.perf_counter()
    out = sampler.generate(params, prompts, sp, example_ids=ids, batch_size=run["batch_size"],
                           shared_prefix=side != "whole", kv_store=store)
    seconds = time.perf_counter() - start
    assert all(len(s.tokens) == new_tokens for s in out)
    return seconds


def time_hf(model, prompts, run: dict, new_tokens: int, pad_id: int) -> float:
    """transformers' generate over the same batches of left-padded prompts."""
    import torch
    from cai_jax.inference.sampling_buckets import left_pad, length_sorted_batches
    t = run["temperature"]
    sampling = dict(do_sample=False) if t == 0 else dict(do_sample=True, temperature=t, top_k=0, top_p=1.0)
    start = time.perf_counter()
    with torch.inference_mode():
        for idx in length_sorted_batches([len(p) for p in prompts], run["batch_size"]):
            rows = [prompts[i] for i in idx]
            tokens, mask = left_pad(rows, len(rows), max(map(len, rows)), pad_id)
            out = model.generate(torch.tensor(tokens, dtype=torch.long),
                                 attention_mask=torch.tensor(mask, dtype=torch.long),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                 pad_token_id=pad_id, **sampling)
            assert out.shape[1] == tokens.shape[1] + new_tokens
    return time.perf_counter() - start


def bench_shape(name: str, loaded, prompts, run: dict, args, hf) -> list[str]:
    from cai_jax.inference import prefix_groups
    from cai_jax.inference.sampling import TRACE_COUNTS, Sampler
    from cai_jax.weights.tokenizer import pad_token_id

    sampler = Sampler(loaded.config, loaded.tokenizer, mesh=None, progress=False)
    n_new = run["max_new_tokens"]
    sides = ["whole", "shared"] + (["stored"] if "previous" in run else [])
    programs = {}
    for side in sides:  # untimed: compile both lengths
        time_ours(sampler, loaded.params, prompts, run, 1, side)
        before = sum(TRACE_COUNTS[k] for k in ("prefill", "decode"))
        time_ours(sampler, loaded.params, prompts, run, n_new, side)
        programs[side] = sum(TRACE_COUNTS[k] for k in ("prefill", "decode")) - before
    if hf is not None:
        time_hf(hf, prompts[:2], run, 2, pad_token_id(loaded.tokenizer))  # warm-up
    best = {(side, n): float("inf") for side in list(sides) + (["transformers"] if hf else [])
            for n in (1, n_new)}
    for _ in range(args.repeats):
        for n in (1, n_new):
            for side in sides:
                best[(side, n)] = min(best[(side, n)], time_ours(sampler, loaded.params, prompts, run, n, side))
            if hf is not None:
                best[("transformers", n)] = min(best[("transformers", n)],
                                                time_hf(hf, prompts, run, n, pad_token_id(loaded.tokenizer)))
    batches = prefix_groups.batches_of_groups(prompts, prefix_groups.auto_keys(prompts), run["batch_size"])
    shared_tokens = sum(prefix_groups.tokens_to_run(b) for b in batches)
    whole_tokens = sum(map(len, prompts))
    lines = [f"\n## {name}: {len(prompts)} prompts of {whole_tokens / len(prompts):.0f} tokens on average, "
             f"{n_new} new tokens, batch {run['batch_size']}, temperature {run['temperature']}; "
             f"prefill tokens with sharing {shared_tokens} of {whole_tokens} "
             f"({shared_tokens / whole_tokens:.2f})\n",
             "| side | prefill s | decode s | total s | tokens/s | programs | total vs whole | total vs transformers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = {side: best[(side, n_new)] for side in {s for s, _ in best}}
    for side in [s for s in ("whole", "shared", "stored", "transformers") if s in total]:
        prefill = best[(side, 1)]
        ratio_hf = f"{total['transformers'] / total[side]:.2f}x" if "transformers" in total else "-"
        lines.append(f"| {side} | {prefill:.1f} | {total[side] - prefill:.1f} | {total[side]:.1f} | "
                     f"{len(prompts) * n_new / total[side]:.1f} | {programs.get(side, '-')} | "
                     f"{total['whole'] / total[side]:.2f}x | {ratio_hf} |")
    return lines


def main():
    args = parse_args()
    import jax
    from cai_jax.weights.loader import load_model
    print(f"# shared-prefix prefill; jax {jax.__version__}, {os.cpu_count()} CPUs "
          f"({_cpu_name()}), load average {os.getloadavg()[0]:.1f}")
    print("# speed-ups are whole / shared and transformers / ours: above 1 means faster")
    for name in args.shapes.split(","):
        if name not in SHAPES:
            sys.exit(f"error: --shapes: unknown shape {name!r}; expected some of {', '.join(SHAPES)}")
        source = "qwen2.5-coder-0.5b-instruct" if name == "pairs" else "smollm2"
        loaded = load_model(source)
        if name == "pairs":
            prompts, run = pairs_prompts(config("default"), loaded.tokenizer, args.prompts or 64)
        else:
            cfg, purpose, previous = ((config("default"), "critique0", "") if name == "sl_critique"
                                      else (config("reproduce"), "revision3", "critique3"))
            prompts, run = sl_prompts(cfg, loaded.tokenizer, loaded.config.max_seq_len, args.prompts or 32,
                                      purpose, previous)
        hf = None
        if not args.skip_hf:
            from bench_sampler import load_hf
            hf = load_hf(loaded, os.path.join(tempfile.mkdtemp(prefix="bench-hf-"), name), args.torch_threads)
        print("\n".join(bench_shape(name, loaded, prompts, run, args, hf)), flush=True)
        del hf, loaded


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
