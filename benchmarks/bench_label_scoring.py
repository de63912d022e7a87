"""Label throughput of the feedback labeller: shared-prefix scoring against a
full forward pass per prompt and against transformers (torch) scoring the same
prompts, in one run (issue #16, item 3).

    python benchmarks/bench_label_scoring.py                        # SmolLM2, multiple choice, few-shot
    python benchmarks/bench_label_scoring.py --model qwen2.5-coder-0.5b-instruct --source pointwise

The labeller is the feedback stage's (chat rendering, our constitution, all
its exemplars, K principles, both orders for multiple choice) on the first
--pairs HH harmless-base test pairs. Each method labels them twice; the second
run is timed (the first compiles). Every method's labels are compared with the
full forward pass's: the largest |difference in p_a| and in option mass.

transformers runs the same rows through AutoModelForCausalLM, loaded from our
weights exported as an HF directory: the same length-sorted batches, left
padding with position ids from the mask, and the option log-probs read at the
last position (logits_to_keep=1), torch with as many threads as cores.

Writes <out>/<model>_<source>.json and .md (default out:
benchmarks/results/label_scoring/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)  # bench_sampler's load_hf
SHARED = os.environ.get("CAI_JAX_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
HH_TEST = os.path.join(SHARED, "hh-rlhf", "harmless-base-test.jsonl.gz")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model reference (cai_jax/model_ref.py)")
    p.add_argument("--source", default="multiple_choice", choices=("multiple_choice", "pointwise"))
    p.add_argument("--pairs", type=int, default=16, help="HH test pairs to label")
    p.add_argument("--principles", type=int, default=2)
    p.add_argument("--exemplars", type=int, default=-1, help="few-shot exemplars (-1: all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--render", default="chat", choices=("chat", "hh"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no_transformers", action="store_true")
    p.add_argument("--tokens_only", action="store_true",
                   help="only count the tokens each method runs (no timing)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "label_scoring"))
    return p.parse_args(argv)


def hf_option_logprobs(model, token_ids, pad_id, batch_size):
    """The OptionScorer.option_logprobs contract, computed by transformers."""
    import torch

    from cai_jax.inference.sampling_buckets import left_pad, length_sorted_batches

    def option_logprobs(prompts, progress=False, keys=None):
        out = np.zeros((len(prompts), 2))
        for idx in length_sorted_batches([len(r) for r in prompts], batch_size):
            width = max(len(prompts[i]) for i in idx)
            tokens, mask = left_pad([prompts[i] for i in idx], len(idx), width, pad_id)
            mask_t = torch.tensor(mask, dtype=torch.long)
            positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask_t,
                               position_ids=positions, logits_to_keep=1).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)[:, token_ids].double().numpy()
            out[idx] = logp
        return out
    return option_logprobs


def timed_labels(labeler, comparisons):
    labeler.label(comparisons)  # compiles every shape (JAX) / warms the allocator (torch)
    start = time.perf_counter()
    records = labeler.label(comparisons)
    return time.perf_counter() - start, records


def run(args) -> dict:
    from cai_jax.constitution import load_default_constitution
    from cai_jax.data.hh_rlhf import read_pairs
    from cai_jax.inference import prefix_groups
    from cai_jax.rl_cai import feedback as fb
    from cai_jax.weights.loader import load_model
    from cai_jax.weights.tokenizer import pad_token_id

    model = load_model(args.model)
    kind = fb.PointwiseLabeler if args.source == "pointwise" else fb.FeedbackLabeler
    labeler = kind(model, load_default_constitution(), style=args.render, num_principles=args.principles,
                   both_orders=True, num_exemplars=args.exemplars, seed=0, batch_size=args.batch_size,
                   max_len=1024, min_bucket=128)
    pairs = read_pairs(HH_TEST, limit=args.pairs)
    comparisons = [fb.FeedbackComparison(f"hh{i}", "harmless", p.context, p.chosen, p.rejected)
                   for i, p in enumerate(pairs)]
    queries, principles = labeler._queries(comparisons)
    rows = [q.ids + labeler.prefix_ids for q in queries]
    result = {"model": args.model, "source": args.source, "render": args.render, "pairs": len(comparisons),
              "prompts": len(rows), "mean_prompt_tokens": float(np.mean([len(r) for r in rows])),
              "exemplars": len(labeler.shots), "principles": args.principles, "batch_size": args.batch_size,
              "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "load_average_at_start": os.getloadavg()[0], "methods": {}}
    # Work before padding: every prompt whole, against each group's prefix once
    # plus its suffixes, under the grouping the labeller picks.
    keys = prefix_groups.pick_keys(rows, [
        [(q.comparison, q.principle) for q in queries],
        [(comparisons[q.comparison].kind, principles[q.comparison][q.principle].id) for q in queries],
        [q.comparison for q in queries]])
    result["tokens_full"] = sum(len(r) for r in rows)
    result["tokens_shared"] = prefix_groups.tokens_to_run(prefix_groups.split_groups(rows, keys))
    print(f"tokens: {result['tokens_full']} full, {result['tokens_shared']} shared "
          f"({result['tokens_full'] / result['tokens_shared']:.2f}x fewer)", flush=True)
    if args.tokens_only:
        return result
    records = {}
    for name, shared in (("full_forward", False), ("shared_prefix", True)):
        labeler.shared_prefix = shared
        seconds, records[name] = timed_labels(labeler, comparisons)
        result["methods"][name] = {"seconds": seconds, "labels_per_s": len(comparisons) / seconds}
        print(f"{name}: {seconds:.1f} s, {len(comparisons) / seconds:.3f} labels/s", flush=True)
    if not args.no_transformers:
        from bench_sampler import load_hf

        with tempfile.TemporaryDirectory() as directory:
            hf = load_hf(model, os.path.join(directory, "hf"), args.threads)
        labeler.scorer.option_logprobs = hf_option_logprobs(
            hf, [int(t) for t in np.asarray(labeler.scorer.token_ids)], pad_token_id(labeler.tokenizer),
            args.batch_size)
        seconds, records["transformers"] = timed_labels(labeler, comparisons)
        result["methods"]["transformers"] = {"seconds": seconds, "labels_per_s": len(comparisons) / seconds}
        print(f"transformers: {seconds:.1f} s, {len(comparisons) / seconds:.3f} labels/s", flush=True)
    reference = records["full_forward"]
    for name, recs in records.items():
        m = result["methods"][name]
        m["max_abs_diff_p_a"] = float(max(abs(a["p_a"] - b["p_a"]) for a, b in zip(recs, reference)))
        m["max_abs_diff_option_mass"] = float(max(abs(a["option_mass"] - b["option_mass"])
                                                  for a, b in zip(recs, reference)))
        m["speedup_vs_full_forward"] = m["labels_per_s"] / result["methods"]["full_forward"]["labels_per_s"]
    result["load_average_at_end"] = os.getloadavg()[0]
    result["command"] = "python benchmarks/bench_label_scoring.py " + " ".join(sys.argv[1:])
    return result


def table(result: dict) -> str:
    lines = [f"Label scoring, {result['model']}, {result['source']} ({result['render']} rendering), "
             f"{result['pairs']} HH pairs = {result['prompts']} prompts of {result['mean_prompt_tokens']:.0f} "
             f"tokens on average, {result['exemplars']} exemplars, {result['principles']} principles, "
             f"batch {result['batch_size']}, {result['threads']} threads; load average "
             f"{result['load_average_at_start']:.1f} at start, {result['load_average_at_end']:.1f} at end.",
             f"Tokens run before padding: {result['tokens_full']} with a full pass per prompt, "
             f"{result['tokens_shared']} with shared prefixes "
             f"({result['tokens_full'] / result['tokens_shared']:.2f}x fewer).",
             "", "| method | seconds | labels/s | vs full forward | max abs diff p_a | max abs diff option mass |",
             "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['seconds']:.1f} | {m['labels_per_s']:.3f} | {m['speedup_vs_full_forward']:.2f}x "
                     f"| {m['max_abs_diff_p_a']:.1e} | {m['max_abs_diff_option_mass']:.1e} |")
    return "\n".join(lines + ["", f"`{result['command']}`", ""])


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    if args.tokens_only:
        return
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.model}_{args.source}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
