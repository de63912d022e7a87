"""Answer pairs for AI feedback (stage `pairs`).

Two ways to make a pair, chosen by `pairs.mode`:

* "sampled" (the paper): the SL-CAI model answers every prompt twice,
  sampled independently at `pairs.temperature` (the paper samples at T = 1).
  Which answer is better is left to the feedback stage's judge.
* "contrastive" (RLCD, Yang et al. 2023): the model answers every prompt
  twice under the two system messages of one of the constitution's
  contrastive framings (drawn per prompt), one asking for a better answer and
  one for a worse. The record says which slot holds the answer made under
  the better framing (`construction`), so the feedback stage can label the
  pair by how it was made (`feedback.source="construction"`), and a judge's
  labels on the same pairs can be checked against it. The better answer's
  slot is drawn per prompt, so position carries no label. A framing may also
  give openings the answers are made to begin with (`better_starts`,
  `worse_starts`, one drawn per prompt and kept in `construction`): the
  recorded answer is the opening plus what the model wrote after it. The model should
  be a chat model that follows system messages: SmolLM2-135M answers alike
  under both.

`pairs.pairs_per_prompt` > 1 answers each prompt several times, one pair
each (ids "<prompt>#2", ...).

Red-team prompts give the "harmless" pairs; helpful prompts give the
"helpful" pairs for the helpfulness part of the preference-model mix.

Artifact `pairs.jsonl`, one record per prompt:

    {"id", "kind": "harmless" | "helpful", "prompt": [{"role", "content"}, ...],
     "answer_a", "answer_b", "finish_a", "finish_b", "sampling": {...},
     "construction": {"framing": id, "better": "a" | "b",
                      "better_start"?, "worse_start"?}}   (contrastive only)

Records are appended as each batch finishes, so a killed stage resumes with the
prompts it had not answered yet. Each answer's randomness depends only on the
seed and its id, so a resumed run samples what an unbroken one would.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections
from ml_collections import config_dict
from tqdm.auto import tqdm

from cai_jax import artifacts, processes
from cai_jax.constitution import ContrastiveFraming, constitution_from_config, sample_principles
from cai_jax.data.conversation import Turn, answer_stop_strings, build_initial_prompt, to_messages
from cai_jax.data.prompt_sets import load_prompts
from cai_jax.inference.sampling_buckets import cut_at_stops
from cai_jax.model_ref import resolve
from cai_jax.weights.tokenizer import encode_text

KIND_OF_SOURCE = {"red_team": "harmless", "helpful": "helpful"}
MODES = ("sampled", "contrastive")


def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # "sampled" or "contrastive" (see the module docstring).
        "mode": "sampled",
        # The model that answers: a model reference (cai_jax/model_ref.py).
        "model_source": "sl_cai",
        "temperature": 1.0,
        # None: config.sampling's value.
        "max_new_tokens": config_dict.placeholder(int),
        # Rows per sampler batch (None: config.sampling's). A larger model's
        # decode is bound by reading its weights, so larger batches cost little more.
        "batch_size": config_dict.placeholder(int),
        # Prompts per kind after config.data's limits (0: all). include_helpful
        # False samples only red-team pairs (helpfulness then comes from human
        # pairs, pm_train.helpful_pairs_path).
        "red_team_limit": 0,
        "helpful_limit": 0,
        "include_helpful": True,
        # Pairs made from each prompt, each sampled (and, if contrastive, given
        # its better slot) independently. More pairs from the same prompts:
        # there are only so many red-team prompts to train on.
        "pairs_per_prompt": 1,
        # Prompts whose rendering is longer than this many tokens are skipped.
        "max_prompt_tokens": 512,
    })


def check_section(section) -> None:
    if section.mode not in MODES:
        raise ValueError(f"pairs.mode must be one of {MODES}, got {section.mode!r}")


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
        out += [{"id": pair_id(f"{kind}:{p.id}", k), "kind": kind, "conversation": p.conversation()}
                for p in pool for k in range(section.pairs_per_prompt)]
    return out


def pair_id(prompt_key: str, k: int) -> str:
    """The id of a prompt's k-th pair (0-based): the prompt's own key for the
    first, so one pair per prompt keeps the ids it always had."""
    return prompt_key if k == 0 else f"{prompt_key}#{k + 1}"


def prompt_key(pair_id_: str) -> str:
    """The prompt a pair was made from (pairs of one prompt share it)."""
    return pair_id_.split("#", 1)[0]


def generator_style(tokenizer, configured: str, mode: str) -> str:
    """The rendering the answering model reads. Contrastive framings are system
    messages, so they need the model's chat template whatever config.data.render
    says about the policy."""
    if mode == "contrastive":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("pairs.mode='contrastive' needs a chat model (its framings are system "
                             "messages); pairs.model_source has no chat template")
        return "chat"
    return configured


def draw_construction(p: dict, framings: Sequence[ContrastiveFraming], seed: int) -> dict:
    """The framing a prompt is answered under and the slot of its better answer,
    both drawn from (seed, prompt id) alone."""
    of_kind = [f for f in framings if f.kind == p["kind"]]
    if not of_kind:
        raise ValueError(f"pairs.mode='contrastive': the constitution has no contrastive_framings of "
                         f"kind {p['kind']!r} (see constitutions/README.md)")
    framing = sample_principles(of_kind, 1, seed=seed, example_id=p["id"], kind="contrastive_framing")[0]
    slot = sample_principles(("a", "b"), 1, seed=seed, example_id=p["id"], kind="better_slot")[0]
    drawn = {"framing": framing.id, "better": slot}
    for side, starts in (("better", framing.better_starts), ("worse", framing.worse_starts)):
        if starts:
            drawn[f"{side}_start"] = sample_principles(starts, 1, seed=seed, example_id=p["id"],
                                                       kind=f"{side}_start")[0]
    return drawn


def answer_starts(p: dict) -> tuple[str, str]:
    """The openings answers a and b are made to begin with ("" for none)."""
    c = p.get("construction", {})
    better, worse = c.get("better_start", ""), c.get("worse_start", "")
    return (better, worse) if c.get("better", "a") == "a" else (worse, better)


def prompt_texts(p: dict, style: str, tokenizer, framings: Sequence[ContrastiveFraming]) -> tuple[str, str]:
    """The prompts answers a and b are sampled from: the same one twice, or the
    conversation under each system message of the record's framing."""
    conversation = tuple(p["conversation"])
    if "construction" not in p:
        text = build_initial_prompt(conversation, style=style, tokenizer=tokenizer)
        return text, text
    framing = next(f for f in framings if f.id == p["construction"]["framing"])
    better, worse = (build_initial_prompt((Turn("system", system),) + conversation, style=style,
                                          tokenizer=tokenizer) for system in (framing.better, framing.worse))
    texts = (better, worse) if p["construction"]["better"] == "a" else (worse, better)
    # The sampler continues after each answer's opening.
    return tuple(text + start for text, start in zip(texts, answer_starts(p)))


def sample_pairs(sampler, params, prompts: Sequence[dict], tokenizer, *, style: str, sampling,
                 seed: int, batch_size: int, max_prompt_tokens: int,
                 framings: Sequence[ContrastiveFraming] = ()) -> tuple[list[dict], list[str]]:
    """Two answers per prompt. Returns (records, ids of prompts skipped as too long)."""
    stops = answer_stop_strings(style)
    rows, kept, skipped = [], [], []
    for p in prompts:
        pair_rows = [encode_text(tokenizer, text) for text in prompt_texts(p, style, tokenizer, framings)]
        if max(map(len, pair_rows)) > max_prompt_tokens:
            skipped.append(p["id"])
            continue
        kept.append(p)
        rows += pair_rows
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
        start_a, start_b = answer_starts(p)
        records.append({"id": p["id"], "kind": p["kind"], "prompt": to_messages(p["conversation"]),
                        "answer_a": cut_at_stops(start_a + a.text, stops).strip(),
                        "answer_b": cut_at_stops(start_b + b.text, stops).strip(),
                        "finish_a": a.finish_reason, "finish_b": b.finish_reason, "sampling": settings})
        if "construction" in p:
            records[-1]["construction"] = p["construction"]
    return records, skipped


def run_stage(ctx) -> dict:
    from cai_jax.inference.sampling import Sampler, SamplingParams

    config = ctx.config
    section = config.pairs
    check_section(section)
    prompts = pair_prompts(config)
    if not prompts:
        raise ValueError("pairs: no prompts; check config.data.red_team / helpful and their limits")
    framings: Sequence[ContrastiveFraming] = ()
    if section.mode == "contrastive":
        framings = constitution_from_config(config.constitution, config.seed).contrastive_framings
        for p in prompts:
            p["construction"] = draw_construction(p, framings, config.seed)
    out = processes.open_records(ctx.path("pairs.jsonl"))
    done = out.done_keys()
    todo = [p for p in prompts if p["id"] not in done]
    skipped: list[str] = []
    if todo:
        model = resolve(section.model_source, config, ctx.workdir).load(seed=config.seed, mesh=ctx.mesh)
        if model.tokenizer is None:
            raise ValueError(f"pairs.model_source {section.model_source!r} has no tokenizer")
        style = generator_style(model.tokenizer, config.data.render, section.mode)
        sampler = Sampler(model.config, model.tokenizer, mesh=ctx.mesh, progress=False,
                          shared_prefix=config.sampling.shared_prefix)
        params = model.params  # loaded onto the mesh, each process reading its own shards
        sampling = SamplingParams(
            temperature=section.temperature, top_k=config.sampling.top_k, top_p=config.sampling.top_p,
            max_new_tokens=section.max_new_tokens or config.sampling.max_new_tokens,
            stop_strings=answer_stop_strings(style))
        # The answer must fit in the model's context after the prompt.
        max_prompt = min(section.max_prompt_tokens, model.config.max_seq_len - sampling.max_new_tokens)
        batch = section.batch_size or config.sampling.batch_size
        # Each prompt is two rows; a chunk fills a few sampler batches.
        per_chunk = max(1, 2 * batch)
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="pairs",
                   disable=not ctx.progress)
        for chunk in artifacts.iter_batches(todo, per_chunk):
            records, too_long = sample_pairs(sampler, params, chunk, model.tokenizer, style=style,
                                             sampling=sampling, seed=config.seed, batch_size=batch,
                                             max_prompt_tokens=max_prompt, framings=framings)
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
                                    for r in records),
               "mode": section.mode}
    if section.mode == "contrastive":
        summary["better_in_slot_a"] = sum(r["construction"]["better"] == "a" for r in records)
    if skipped:
        summary["skipped_too_long"] = len(skipped)
    return summary
