"""Answer pairs for AI feedback (stage `pairs`).

The SL-CAI model answers every prompt twice, sampled independently at
`pairs.temperature` (the paper samples at T = 1), through the shared sampler.
Red-team prompts give the "harmless" pairs; helpful prompts give the
"helpful" pairs for the helpfulness part of the preference-model mix.

Artifact `pairs.jsonl`, one record per prompt:

    {"id", "kind": "harmless" | "helpful", "prompt": [{"role", "content"}, ...],
     "answer_a", "answer_b", "finish_a", "finish_b", "sampling": {...}}

Records are appended as each batch finishes, so a killed stage resumes with the
prompts it had not answered yet. Each answer's randomness depends only on the
seed and its id, so a resumed run samples what an unbroken one would.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections
from ml_collections import config_dict
from tqdm.auto import tqdm

from cai_jax import artifacts, sharding as shd
from cai_jax.data.conversation import HH_HUMAN_STOP, build_initial_prompt, to_messages
from cai_jax.data.prompt_sets import load_prompts
from cai_jax.inference.sampling_buckets import cut_at_stops
from cai_jax.model_ref import resolve
from cai_jax.weights.tokenizer import encode_text

KIND_OF_SOURCE = {"red_team": "harmless", "helpful": "helpful"}


def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # The model that answers: a model reference (cai_jax/model_ref.py).
        "model_source": "sl_cai",
        "temperature": 1.0,
        # None: config.sampling's value.
        "max_new_tokens": config_dict.placeholder(int),
        # Prompts per kind after config.data's limits (0: all). include_helpful
        # False samples only red-team pairs (helpfulness then comes from human
        # pairs, pm_train.helpful_pairs_path).
        "red_team_limit": 0,
        "helpful_limit": 0,
        "include_helpful": True,
        # Prompts whose rendering is longer than this many tokens are skipped.
        "max_prompt_tokens": 512,
    })


def pair_prompts(config) -> list[dict]:
    """The prompts to answer: {"id", "kind", "conversation"}, red-team first."""
    section = config.pairs
    out = []
    sources = ("red_team", "helpful") if section.include_helpful else ("red_team",)
    for source_kind in sources:
        pool = load_prompts(config.data, source_kind, "train")
        limit = section[f"{source_kind}_limit"]
        pool = pool[:limit] if limit else pool
        kind = KIND_OF_SOURCE[source_kind]
        out += [{"id": f"{kind}:{p.id}", "kind": kind, "conversation": p.conversation()} for p in pool]
    return out


def stop_strings(style: str) -> tuple[str, ...]:
    # HH text has no end-of-turn token: an answer ends where the next human turn starts.
    return (HH_HUMAN_STOP,) if style == "hh" else ()


def sample_pairs(sampler, params, prompts: Sequence[dict], tokenizer, *, style: str, sampling,
                 seed: int, batch_size: int, max_prompt_tokens: int) -> tuple[list[dict], list[str]]:
    """Two answers per prompt. Returns (records, ids of prompts skipped as too long)."""
    stops = stop_strings(style)
    rows, kept, skipped = [], [], []
    for p in prompts:
        text = build_initial_prompt(p["conversation"], style=style, tokenizer=tokenizer)
        ids = encode_text(tokenizer, text)
        if len(ids) > max_prompt_tokens:
            skipped.append(p["id"])
            continue
        kept.append(p)
        rows += [ids, ids]
    if not kept:
        return [], skipped
    example_ids = [f"{p['id']}/{slot}" for p in kept for slot in ("a", "b")]
    samples = sampler.generate(params, rows, sampling, seed=seed, example_ids=example_ids,
                               batch_size=batch_size)
    settings = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                "max_new_tokens": sampling.max_new_tokens, "seed": seed}
    records = []
    for i, p in enumerate(kept):
        a, b = samples[2 * i], samples[2 * i + 1]
        records.append({"id": p["id"], "kind": p["kind"], "prompt": to_messages(p["conversation"]),
                        "answer_a": cut_at_stops(a.text, stops).strip(),
                        "answer_b": cut_at_stops(b.text, stops).strip(),
                        "finish_a": a.finish_reason, "finish_b": b.finish_reason, "sampling": settings})
    return records, skipped


def run_stage(ctx) -> dict:
    from cai_jax.inference.sampling import Sampler, SamplingParams

    config = ctx.config
    section = config.pairs
    style = config.data.render
    prompts = pair_prompts(config)
    if not prompts:
        raise ValueError("pairs: no prompts; check config.data.red_team / helpful and their limits")
    out = artifacts.PartialJsonl(ctx.path("pairs.jsonl"))
    done = out.done_keys()
    todo = [p for p in prompts if p["id"] not in done]
    skipped: list[str] = []
    if todo:
        model = resolve(section.model_source, config, ctx.workdir).load(seed=config.seed)
        if model.tokenizer is None:
            raise ValueError(f"pairs.model_source {section.model_source!r} has no tokenizer")
        mesh = shd.make_mesh(config.mesh.to_dict())
        sampler = Sampler(model.config, model.tokenizer, mesh=mesh, progress=False)
        params = shd.place(model.params, shd.param_shardings(model.config, mesh))
        sampling = SamplingParams(
            temperature=section.temperature, top_k=config.sampling.top_k, top_p=config.sampling.top_p,
            max_new_tokens=section.max_new_tokens or config.sampling.max_new_tokens,
            stop_strings=stop_strings(style))
        # The answer must fit in the model's context after the prompt.
        max_prompt = min(section.max_prompt_tokens, model.config.max_seq_len - sampling.max_new_tokens)
        batch = config.sampling.batch_size
        # Each prompt is two rows; a chunk fills a few sampler batches.
        per_chunk = max(1, 2 * batch)
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="pairs",
                   disable=not ctx.progress)
        for chunk in artifacts.iter_batches(todo, per_chunk):
            records, too_long = sample_pairs(sampler, params, chunk, model.tokenizer, style=style,
                                             sampling=sampling, seed=config.seed, batch_size=batch,
                                             max_prompt_tokens=max_prompt)
            out.extend(records)
            skipped += too_long
            bar.update(len(chunk))
        bar.close()
    records = out.finish(order=[p["id"] for p in prompts])
    summary = {"pairs": len(records),
               "harmless": sum(r["kind"] == "harmless" for r in records),
               "helpful": sum(r["kind"] == "helpful" for r in records),
               "identical_answers": sum(r["answer_a"] == r["answer_b"] for r in records),
               "cut_at_length": sum((r["finish_a"] == "length") + (r["finish_b"] == "length")
                                    for r in records)}
    if skipped:
        summary["skipped_too_long"] = len(skipped)
    return summary
