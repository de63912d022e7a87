"""Critique-and-revision data (stage `sl_generate`), the first half of SL-CAI.

For every red-team prompt the helpful model writes an initial answer; then, for
`num_revisions` rounds, a principle drawn at random from the constitution asks
it to critique its latest answer and to revise it (paper section 3.1). Rounds
build on each other: round r sees the kept critiques and revisions of the
earlier rounds, as in the paper's transcripts. Few-shot exemplars from the
constitution lead the prompt. With `direct_revision` the model revises without
writing a critique first (the paper's figure 7 ablation).

Everything goes through the shared sampler, a whole step at a time: the
initial answers of a chunk of prompts in one `generate` call, then all their
round-r critiques in one call, then all their round-r revisions. Finished
prompts are appended to `sl_data.jsonl.partial`, so a killed run resumes
with the prompts it had not finished.

A round's `dropped` is None when its revision was kept, else why not: a clean-up
reason for the revision (cleanup.DROP_REASONS), "critique_<reason>" when the
critique was unusable (then no revision is asked for), or "too_long" when the
prompt did not fit the model's context even without exemplars. A dropped round
is left out of later rounds' transcripts and the answer stays as it was.

Helpful prompts get plain answers from the same model (`helpful_data.jsonl`),
mixed into the SFT data so the finetuned model stays helpful.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np
from ml_collections import config_dict
from tqdm.auto import tqdm

from cai_jax import artifacts, processes
from cai_jax.model_ref import resolve
from cai_jax.constitution import (
    Constitution,
    CritiqueRevisionPair,
    constitution_from_config,
    sample_principles,
)
from cai_jax.data.conversation import (
    TRANSCRIPT_STOP_STRINGS,
    CritiqueRound,
    CritiqueTranscript,
    Turn,
    build_critique_prompt,
    build_direct_revision_prompt,
    build_initial_prompt,
    build_revision_prompt,
)
from cai_jax.data.prompt_sets import Prompt, load_prompts
from cai_jax.sl_cai.cleanup import Cleaned, clean_answer, clean_critique, clean_revision
from cai_jax.weights.tokenizer import encode_text

def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "num_revisions": 4,  # as in the paper
        # Prompts per kind after config.data's limits (0: all), like the pairs
        # and eval sections' limits: each stage can use a different share of the pool.
        "red_team_limit": 0,
        "helpful_limit": 0,
        "num_fewshot": 2,  # critique/revision exemplars from the constitution per prompt
        "direct_revision": False,  # revise without a critique (paper figure 7)
        # Sampling settings; None takes the value from the shared `sampling` section.
        "temperature": config_dict.placeholder(float),
        "top_k": config_dict.placeholder(int),
        "top_p": config_dict.placeholder(float),
        "batch_size": config_dict.placeholder(int),
        "answer_max_new_tokens": config_dict.placeholder(int),
        "critique_max_new_tokens": config_dict.placeholder(int),
        "revision_max_new_tokens": config_dict.placeholder(int),
        # Prompts that go through all rounds together and are then saved: the
        # unit of resume. Larger chunks fill the sampler's batches better.
        "prompts_per_chunk": 32,
        # Plain answers to the helpful prompts for the SFT mix.
        "helpful_answers": True,
    })


# ------------------------------------------------------------ inputs

@dataclasses.dataclass(frozen=True)
class StepSettings:
    temperature: float
    top_k: int
    top_p: float
    answer_max_new_tokens: int
    critique_max_new_tokens: int
    revision_max_new_tokens: int
    batch_size: int

    @classmethod
    def from_config(cls, section, sampling) -> "StepSettings":
        def pick(name, fallback):
            value = section[name]
            return sampling[fallback] if value is None else value
        return cls(temperature=pick("temperature", "temperature"), top_k=pick("top_k", "top_k"),
                   top_p=pick("top_p", "top_p"),
                   answer_max_new_tokens=pick("answer_max_new_tokens", "max_new_tokens"),
                   critique_max_new_tokens=pick("critique_max_new_tokens", "max_new_tokens"),
                   revision_max_new_tokens=pick("revision_max_new_tokens", "max_new_tokens"),
                   batch_size=pick("batch_size", "batch_size"))


# ------------------------------------------------------------ sampling

# generate(prompt token lists, max_new_tokens, purpose, example ids) -> raw texts.
GenerateFn = Callable[[list[list[int]], int, str, list[str]], list[str]]


def _generate_some(generate: GenerateFn, prompts, max_new_tokens, purpose, example_ids) -> list[str]:
    # A step with nothing left to sample (every round dropped) makes no sampler call.
    return generate(prompts, max_new_tokens, purpose, example_ids) if prompts else []


def step_seed(seed: int, purpose: str) -> int:
    """A 31-bit sampler seed per (run seed, step): with per-example ids this makes
    every sample depend only on (seed, step, prompt id), not on batch layout."""
    digest = hashlib.sha256(f"sl_generate|{seed}|{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# A sampled section ends at the next HH transcript label (chat models end with
# their end-of-turn token; the strings are harmless there). Clean-up cuts again.
#
# With the sampler's shared_prefix on, each step's keys and values are kept
# for the next step (a KVStore): a revision prompt continues its critique
# prompt and critique, the next critique prompt the revision, so only what was
# added since runs through the model.
def make_generate_fn(sampler, params, settings: StepSettings, seed: int,
                     extra_stops: Sequence[str] = TRANSCRIPT_STOP_STRINGS) -> GenerateFn:
    from cai_jax.inference.kv_store import KVStore
    from cai_jax.inference.sampling import SamplingParams

    store = KVStore() if sampler.shared_prefix else None

    def generate(prompts, max_new_tokens, purpose, example_ids):
        params_ = SamplingParams(temperature=settings.temperature, top_k=settings.top_k,
                                 top_p=settings.top_p, max_new_tokens=max_new_tokens,
                                 stop_strings=tuple(extra_stops))
        samples = sampler.generate(params, prompts, params_, seed=step_seed(seed, purpose),
                                   example_ids=list(example_ids), batch_size=settings.batch_size,
                                   kv_store=store)
        return [s.text for s in samples]

    return generate


# ------------------------------------------------------------ the loop

@dataclasses.dataclass
class _Work:
    """One red-team prompt on its way through the rounds."""
    item: Prompt
    exemplars: tuple
    initial: Optional[Cleaned] = None  # set by the answer step
    rounds: list = dataclasses.field(default_factory=list)  # records, dropped ones too
    kept: list = dataclasses.field(default_factory=list)  # CritiqueRound, for the transcript

    def transcript(self) -> CritiqueTranscript:
        conv = self.item.conversation() + (Turn("assistant", self.initial.text),)
        return CritiqueTranscript(conv, tuple(self.kept))

    @property
    def current_answer(self) -> str:
        return self.kept[-1].revision if self.kept else self.initial.text


class PromptBuilder:
    """Renders prompts as token ids and fits them into the model's context.

    When a prompt plus its new tokens would not fit, exemplars are left out
    one at a time (last first); if it still does not fit, None tells the
    caller to drop that round as "too_long".
    """

    def __init__(self, tokenizer, style: str, max_seq_len: int):
        self.tokenizer, self.style, self.max_seq_len = tokenizer, style, max_seq_len

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    @property
    def style_kw(self) -> dict:
        return {"style": self.style, "tokenizer": self.tokenizer}

    def fit(self, render: Callable[[tuple], str], exemplars: Sequence,
            max_new_tokens: int) -> Optional[list[int]]:
        """Token ids of render(exemplars[:k]) for the largest k that fits, or None."""
        for k in range(len(exemplars), -1, -1):
            ids = self.encode(render(tuple(exemplars[:k])))
            if len(ids) + max_new_tokens <= self.max_seq_len:
                return ids
        return None


def _run_rounds(work: list[_Work], constitution: Constitution, builder: PromptBuilder,
                generate: GenerateFn, settings: StepSettings, num_revisions: int,
                direct: bool, seed: int) -> None:
    """Initial answers, then num_revisions rounds, each batched over all of `work`."""
    # Initial answers (no exemplars: the helpful model answers as it would alone).
    prompts = [builder.fit(lambda _, w=w: build_initial_prompt(w.item.conversation(), **builder.style_kw),
                           (), settings.answer_max_new_tokens) for w in work]
    too_long = [w.item.id for w, p in zip(work, prompts) if p is None]
    if too_long:
        raise ValueError(f"prompts {too_long[:5]} do not fit the model's context "
                         f"({builder.max_seq_len} tokens) with answer_max_new_tokens="
                         f"{settings.answer_max_new_tokens}; shorten them or lower "
                         "sl_generate.answer_max_new_tokens")
    texts = _generate_some(generate, prompts, settings.answer_max_new_tokens, "answer",
                           [w.item.id for w in work])
    for w, text in zip(work, texts):
        w.initial = clean_answer(text)

    for r in range(num_revisions):
        principles = {w.item.id: sample_principles(constitution, 1, seed=seed, example_id=w.item.id,
                                                   round=r)[0] for w in work}
        records = {w.item.id: _round_record(principles[w.item.id], direct) for w in work}

        if direct:
            ready = work
        else:
            ready = _critique_step(work, principles, records, builder, generate, settings, r)

        revise = []
        for w in ready:
            p = principles[w.item.id]
            rec = records[w.item.id]
            if direct:
                def render(shots, w=w, p=p):
                    return build_direct_revision_prompt(w.transcript(), p.revision_request,
                                                        exemplars=shots, **builder.style_kw)
            else:
                def render(shots, w=w, p=p, critique=rec["critique"]):
                    return build_revision_prompt(w.transcript(), p.critique_request, critique,
                                                 p.revision_request, exemplars=shots, **builder.style_kw)
            ids = builder.fit(render, w.exemplars, settings.revision_max_new_tokens)
            if ids is None:
                rec["dropped"] = "too_long"
            else:
                revise.append((w, ids))
        texts = _generate_some(generate, [ids for _, ids in revise], settings.revision_max_new_tokens,
                         f"revision{r}", [w.item.id for w, _ in revise])
        for (w, _), text in zip(revise, texts):
            p, rec = principles[w.item.id], records[w.item.id]
            cleaned = clean_revision(text, p.revision_request,
                                     None if direct else p.critique_request, rec["critique"],
                                     exemplar_texts=exemplar_texts(w.exemplars))
            rec["revision"], rec["dropped"] = cleaned.text, cleaned.dropped
            if cleaned.dropped is None:
                w.kept.append(CritiqueRound(
                    revision_request=p.revision_request, revision=cleaned.text,
                    critique_request=None if direct else p.critique_request,
                    critique=None if direct else rec["critique"]))
        for w in work:
            w.rounds.append(records[w.item.id])


def exemplar_texts(exemplars) -> list[str]:
    """The critiques and revisions of the few-shot exemplars a prompt showed:
    what a sampled critique or revision must not copy."""
    return [text for e in exemplars for rnd in e.rounds for text in (rnd.critique, rnd.revision) if text]


def _round_record(principle: CritiqueRevisionPair, direct: bool) -> dict:
    return {"principle_id": principle.id,
            "critique_request": None if direct else principle.critique_request,
            "critique": None, "revision_request": principle.revision_request,
            "revision": None, "dropped": None}


def _critique_step(work, principles, records, builder, generate, settings, r) -> list[_Work]:
    """Samples round r's critiques; returns the prompts whose critique is usable.
    A round whose critique is dropped is dropped as a whole ("critique_<reason>")."""
    asks = []
    for w in work:
        p = principles[w.item.id]
        def render(shots, w=w, p=p):
            return build_critique_prompt(w.transcript(), p.critique_request, exemplars=shots,
                                         **builder.style_kw)
        ids = builder.fit(render, w.exemplars, settings.critique_max_new_tokens)
        if ids is None:
            records[w.item.id]["dropped"] = "too_long"
        else:
            asks.append((w, ids))
    texts = _generate_some(generate, [ids for _, ids in asks], settings.critique_max_new_tokens,
                     f"critique{r}", [w.item.id for w, _ in asks])
    ready = []
    for (w, _), text in zip(asks, texts):
        cleaned = clean_critique(text, principles[w.item.id].critique_request,
                                 exemplar_texts=exemplar_texts(w.exemplars))
        records[w.item.id]["critique"] = cleaned.text
        if cleaned.dropped is None:
            ready.append(w)
        else:
            records[w.item.id]["dropped"] = f"critique_{cleaned.dropped}"
    return ready


def revise_prompts(items: Sequence[Prompt], constitution: Constitution, builder: PromptBuilder,
                   generate: GenerateFn, settings: StepSettings, *, num_revisions: int,
                   num_fewshot: int, direct_revision: bool, seed: int) -> list[dict]:
    """sl_data records for `items`: initial answer, the rounds, final answer."""
    if num_fewshot > len(constitution.critique_exemplars):
        raise ValueError(f"sl_generate.num_fewshot is {num_fewshot} but constitution {constitution.name!r} "
                         f"has {len(constitution.critique_exemplars)} critique exemplars")
    work = [_Work(item, tuple(sample_principles(constitution.critique_exemplars, num_fewshot, seed=seed,
                                                example_id=item.id, kind="critique_exemplars")))
            for item in items]
    _run_rounds(work, constitution, builder, generate, settings, num_revisions, direct_revision, seed)
    return [{"id": w.item.id, "category": w.item.category, "prompt": w.item.text,
             "initial_answer": w.initial.text, "initial_dropped": w.initial.dropped,
             "rounds": w.rounds, "final_answer": w.current_answer} for w in work]


def answer_prompts(items: Sequence[Prompt], builder: PromptBuilder, generate: GenerateFn,
                   settings: StepSettings) -> list[dict]:
    """helpful_data records: one plain answer per prompt."""
    prompts = [builder.fit(lambda _, it=it: build_initial_prompt(it.conversation(), **builder.style_kw),
                           (), settings.answer_max_new_tokens) for it in items]
    keep = [(it, p) for it, p in zip(items, prompts) if p is not None]
    texts = _generate_some(generate, [p for _, p in keep], settings.answer_max_new_tokens, "helpful",
                     [it.id for it, _ in keep])
    by_id = {it.id: clean_answer(text) for (it, _), text in zip(keep, texts)}
    out = []
    for it in items:
        cleaned = by_id.get(it.id, Cleaned("", "too_long"))
        out.append({"id": it.id, "category": it.category, "prompt": it.text,
                    "answer": cleaned.text, "dropped": cleaned.dropped})
    return out


# ------------------------------------------------------------ the stage

def _generate_resumable(path: str, items: Sequence[Prompt], chunk: int, make_records,
                        desc: str, progress: bool, stamp: dict) -> list[dict]:
    """Runs make_records over the items not yet in `<path>.partial`, chunk by chunk."""
    log = processes.open_records(path)
    done = log.done_keys()
    todo = [it for it in items if it.id not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress,
               dynamic_ncols=True)
    for batch in artifacts.iter_batches(todo, max(1, chunk)):
        log.extend({**r, "sampling": stamp} for r in make_records(batch))
        bar.update(len(batch))
    bar.close()
    return log.finish(order=[it.id for it in items])


def summarize(sl_records: Sequence[dict], helpful_records: Sequence[dict]) -> dict:
    rounds = [r for rec in sl_records for r in rec["rounds"]]
    dropped = [r["dropped"] for r in rounds if r["dropped"] is not None]
    revised = [rec for rec in sl_records if any(r["dropped"] is None for r in rec["rounds"])]

    def mean_words(texts):
        return float(np.mean([len(t.split()) for t in texts])) if texts else 0.0

    summary = {
        "prompts": len(sl_records),
        "rounds": len(rounds),
        "dropped_revisions": len(dropped),
        "revised_prompts": len(revised),
        "mean_initial_words": mean_words([rec["initial_answer"] for rec in sl_records]),
        "mean_final_words": mean_words([rec["final_answer"] for rec in sl_records]),
        "helpful_prompts": len(helpful_records),
        "helpful_dropped": sum(r["dropped"] is not None for r in helpful_records),
        "mean_helpful_words": mean_words([r["answer"] for r in helpful_records]),
    }
    for reason in sorted(set(dropped)):
        summary[f"dropped_{reason}"] = dropped.count(reason)
    return summary


class _Model:
    """The helpful model, its sampler and prompt builder, loaded on first use
    (a resumed run with nothing left to do never loads it)."""

    def __init__(self, config, settings: StepSettings, mesh, progress: bool):
        self.config, self.settings, self.mesh, self.progress = config, settings, mesh, progress
        self.ref = resolve("base", config)
        self.source = self.ref.source
        self._parts = None

    def parts(self) -> tuple[GenerateFn, PromptBuilder]:
        if self._parts is None:
            from cai_jax.inference.sampling import Sampler
            loaded = self.ref.load(seed=self.config.seed, mesh=self.mesh)
            if loaded.tokenizer is None:
                raise ValueError(f"model source {self.source!r} has no tokenizer; sl_generate needs one")
            sampler = Sampler(loaded.config, loaded.tokenizer, mesh=self.mesh,
                              progress=self.progress, shared_prefix=self.config.sampling.shared_prefix)
            self._parts = (make_generate_fn(sampler, loaded.params, self.settings, self.config.seed),
                           PromptBuilder(loaded.tokenizer, self.config.data.render, loaded.config.max_seq_len))
        return self._parts


def run_stage(ctx) -> dict:
    config, section = ctx.config, ctx.config.sl_generate
    settings = StepSettings.from_config(section, config.sampling)
    constitution = constitution_from_config(config.constitution, config.seed)
    red_team = load_prompts(config.data, "red_team", "train")[:section.red_team_limit or None]
    helpful = (load_prompts(config.data, "helpful", "train")[:section.helpful_limit or None]
               if section.helpful_answers else [])
    model = _Model(config, settings, ctx.mesh, ctx.progress)
    stamp = {**dataclasses.asdict(settings), "seed": config.seed, "render": config.data.render,
             "model": model.source, "constitution": constitution.name,
             "num_revisions": section.num_revisions, "num_fewshot": section.num_fewshot,
             "direct_revision": section.direct_revision}

    def revise(batch):
        generate, builder = model.parts()
        return revise_prompts(batch, constitution, builder, generate, settings,
                              num_revisions=section.num_revisions, num_fewshot=section.num_fewshot,
                              direct_revision=section.direct_revision, seed=config.seed)

    def answer(batch):
        generate, builder = model.parts()
        return answer_prompts(batch, builder, generate, settings)

    sl_records = _generate_resumable(ctx.path("sl_data.jsonl"), red_team, section.prompts_per_chunk,
                                     revise, "sl_generate", ctx.progress, stamp)
    helpful_records = _generate_resumable(ctx.path("helpful_data.jsonl"), helpful,
                                          section.prompts_per_chunk, answer, "helpful answers",
                                          ctx.progress, stamp)
    return summarize(sl_records, helpful_records)
