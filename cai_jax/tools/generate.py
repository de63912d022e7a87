"""Sample answers from a model on the command line.

    python -m cai_jax.tools.generate --model smollm2-135m --prompt "The capital of France is"
    python -m cai_jax.tools.generate --model init:tiny --prompts_file prompts.jsonl --chat \\
        --temperature 0.7 --top_p 0.9 --max_new_tokens 64 --format jsonl

Answers go to stdout (progress to stderr), in the order the prompts were given.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Optional, Sequence

from cai_jax.errors import MalformedFileError, exit_on_user_error, json_error_text

# Short names for the bundled model; anything else goes to load_model as is.
MODEL_ALIASES = {"smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cai_jax.tools.generate",
        description="Sample answers with cai_jax's KV-cache sampler.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="weights to load: smollm2-135m (the bundled SmolLM2-135M-Instruct), "
                        "qwen2.5-coder-0.5b-instruct or qwen2.5-coder-1.5b-instruct (README's model "
                        "table), gguf:PATH, hf:DIR (a local HF directory), ckpt:DIR (a cai_jax model "
                        "directory) or init:NAME (random weights of a ladder size, e.g. init:tiny)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt; repeat the flag for several")
    p.add_argument("--prompts_file",
                   help="more prompts: a text file with one prompt per line, or JSONL whose "
                        "objects hold a 'prompt' string")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template "
                        "(with the assistant's generation prompt)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens; 0 is off")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="keep the most likely tokens holding this much mass; 1 is off")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--stop", action="append", default=[],
                   help="a stop string: the answer is cut before it (repeatable)")
    p.add_argument("--ignore_eos", action="store_true",
                   help="do not stop at EOS / end-of-turn tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    # 32 rows keep decode compute-bound on the 2-core reference machine: 32 prompts x 128
    # tokens took 25.7 s as a whole process against 34.4 s at batch 8 (issue #20).
    p.add_argument("--batch_size", type=int, default=32,
                   help="prompts decoded together (fewer prompts decode as a smaller batch)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="text: a readable block per answer; jsonl: one JSON object per answer "
                        "(index, prompt, text, finish_reason, num_tokens)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no_shared_prefix", action="store_true",
                   help="prefill every prompt whole, even where prompts share a start (a chat "
                        "header, a system message); by default a shared start runs once per batch")
    args = p.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        p.error("give at least one --prompt or a --prompts_file")
    return args


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line, or JSONL objects with a 'prompt' field."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    lines = [line for line in lines if line.strip()]
    looks_jsonl = path.endswith(".jsonl") or (lines and lines[0].lstrip().startswith("{"))
    if not looks_jsonl:
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MalformedFileError(f"{path} line {n}: not JSON ({json_error_text(e)}); use one prompt per "
                                     "line or JSONL") from e
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise MalformedFileError(f"{path} line {n}: expected an object with a 'prompt' string")
        prompts.append(record["prompt"])
    return prompts


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as a user turn, rendered as every stage renders chat prompts."""
    from cai_jax.data.conversation import build_initial_prompt, user

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template")
    return build_initial_prompt((user(prompt),), style="chat", tokenizer=tokenizer)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])

    # Heavy imports after parsing, so --help and usage errors are instant.
    from cai_jax.compile_cache import enable_compilation_cache
    from cai_jax.inference.sampling import Sampler, SamplingParams
    from cai_jax.weights.loader import load_model

    enable_compilation_cache()
    # The imported modules' objects leave the collector's view: its passes while
    # tracing walk fewer objects (16 tokens: 4.87 against 4.94 s, farm-bench, 7 runs).
    gc.freeze()

    loaded = load_model(MODEL_ALIASES.get(args.model, args.model))
    if loaded.tokenizer is None:
        raise SystemExit(f"--model {args.model}: these weights come without a tokenizer")
    texts = [chat_prompt(loaded.tokenizer, p) for p in prompts] if args.chat else prompts
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop),
                              ignore_eos=args.ignore_eos)
    # One device, no mesh: a prompt or a few need no sharding.
    sampler = Sampler(loaded.config, loaded.tokenizer, mesh=None, progress=not args.no_progress,
                      shared_prefix=not args.no_shared_prefix)
    samples = sampler.generate(loaded.params, texts, sampling, seed=args.seed,
                               batch_size=args.batch_size)
    for i, (prompt, sample) in enumerate(zip(prompts, samples)):
        if args.format == "jsonl":
            print(json.dumps({"index": i, "prompt": prompt, "text": sample.text,
                              "finish_reason": sample.finish_reason,
                              "num_tokens": int(len(sample.tokens))}, ensure_ascii=False))
        else:
            print(f"=== [{i}] {prompt}")
            print(sample.text)
            print(f"--- ({sample.finish_reason}, {len(sample.tokens)} tokens)\n")
    sys.stdout.flush()
    # Objects moved to the permanent generation are skipped by the collections
    # Python runs while it shuts down: with jax's and flax's modules and the
    # traced programs alive those took about 0.5 s of every run here (issue #20).
    gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))  # a bad prompts file or switch: one line, exit 2
