"""AI feedback (stage `feedback`): soft labels for pairs of answers.

For each pair the feedback model reads a multiple-choice question (see
feedback_prompts.py) and the label is the softmax over the log-probabilities
of the two option tokens at the answer position: one batched forward pass, no
sampling. SmolLM2 splits " (A)" into " (", "A", ")"; the shared prefix " (" is
appended to the prompt and the first differing tokens ("A" / "B") compared.

Ensembling, as in the paper: K principles are drawn per comparison (seeded by
its id), and each is asked in both orders, (A, B) and (B, A), which cancels the
model's preference for a slot:

    p(answer_a better) = mean_k ( p_k(first | a, b) + 1 - p_k(first | b, a) ) / 2

In chain-of-thought mode the model first writes a reasoning after "Let's think
step-by-step:" (with the shared sampler); the options are scored after it and
each probability is clamped to [cot_clamp_low, cot_clamp_high], because
reasoned answers are overconfident (paper section 4.1).

The feedback model is `feedback.model_source` ("base": config.model, the
pretrained model, as in the paper). Harmless pairs are judged with the
constitution's harmlessness principles, helpful pairs with its helpfulness
principles. Output: `labels.jsonl`, one record per pair, carrying the pair too
(conversation, both answers, whether each is complete), so that preference
training reads this file alone.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cai_jax import artifacts, sharding as shd
from cai_jax.inference.batched_forward import batched_forward
from cai_jax.constitution import (Constitution, FeedbackPrinciple, constitution_from_config,
                                  sample_principles)
from cai_jax.data.conversation import Conversation, as_conversation, to_messages
from cai_jax.models.transformer import Transformer, positions_from_mask
from cai_jax.model_ref import resolve
from cai_jax.rl_cai import feedback_prompts as fp
from cai_jax.weights.loader import LoadedModel
from cai_jax.inference.sampling_buckets import cut_at_stops
from cai_jax.weights.tokenizer import encode_text, pad_token_id

KINDS = ("harmless", "helpful")


def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # "base": config.model (the pretrained model, as in the paper);
        # or any other model reference (cai_jax/model_ref.py: sl_cai, ckpt:DIR, ...).
        "model_source": "base",
        # Principles drawn per comparison (capped by how many the constitution has).
        "num_principles": 2,
        # Ask each principle with the answers in both orders to cancel position bias.
        "both_orders": True,
        # Few-shot exemplars from the constitution (-1: all, 0: none).
        "num_exemplars": -1,
        # Reason first, then answer. Its exemplars are the constitution's
        # chain-of-thought ones (only the paper's files have them; with our
        # constitution the reasoning is zero-shot).
        "chain_of_thought": False,
        "cot_clamp_low": 0.4,
        "cot_clamp_high": 0.6,
        "cot_max_new_tokens": 128,
        "cot_temperature": 1.0,
        "cot_top_p": 0.95,
        # Rows per forward pass; prompts are padded to at least min_bucket
        # tokens and at most max_seq_len (batched_forward.padded_width).
        "batch_size": 8,
        "max_seq_len": 1024,
        "min_bucket": 128,
        # Label only the first `limit` pairs (0: all).
        "limit": 0,
    })


# ------------------------------------------------------------ option tokens

def encode(tokenizer, text: str) -> list[int]:
    return encode_text(tokenizer, text)


def option_token_ids(tokenizer, options: Sequence[str] = fp.OPTIONS) -> tuple[list[int], int, int]:
    """(shared prefix ids, first differing id of option A, of option B).

    " (A)" and " (B)" must tokenize into a common prefix followed by one
    differing token; the prefix is appended to every prompt and the label
    compares the two differing tokens there.
    """
    ids_a, ids_b = encode(tokenizer, options[0]), encode(tokenizer, options[1])
    n = 0
    while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
        n += 1
    if n >= len(ids_a) or n >= len(ids_b):
        raise ValueError(
            f"feedback options {options[0]!r} -> {ids_a} and {options[1]!r} -> {ids_b}: one "
            "tokenization is a prefix of the other, so no single token tells them apart; "
            "use a tokenizer that splits the option letters into their own tokens")
    return ids_a[:n], ids_a[n], ids_b[n]


# ------------------------------------------------------------ the scorer

class OptionScorer:
    """p(option A) at the end of each prompt, from one forward pass per batch.

    Prompts are token ids that already end with the options' shared prefix.
    Rows are left-padded so the last position is the answer position and the
    model computes logits only there (`last_only`), never [B, T, vocab].
    """

    def __init__(self, model_config, params, token_a: int, token_b: int, *, pad_id: int = 0,
                 batch_size: int = 8, max_len: int = 1024, min_bucket: int = 128, mesh=None):
        if "lm" not in model_config.heads:
            raise ValueError(f"the feedback model needs a language-model head; it has {model_config.heads}")
        self.model = Transformer(model_config)
        self.mesh = mesh or shd.make_mesh({"data": -1})
        self.params = shd.place(params, shd.param_shardings(model_config, self.mesh))
        self.token_ids = jnp.asarray([token_a, token_b], jnp.int32)
        self.pad_id, self.max_len, self.min_bucket = pad_id, max_len, min_bucket
        self.batch_size = batch_size
        self._forward = jax.jit(self._option_logprobs)

    def _option_logprobs(self, params, tokens_bt, mask_bt):
        with nn.logical_axis_rules(shd.DEFAULT_RULES):
            outputs, _ = self.model.apply({"params": params}, tokens_bt, positions_from_mask(mask_bt),
                                          mask_bt, last_only=True)
        logp_bv = jax.nn.log_softmax(outputs["logits"][:, -1].astype(jnp.float32), axis=-1)
        return logp_bv[:, self.token_ids]  # [batch, 2]

    def option_logprobs(self, prompts: Sequence[Sequence[int]], progress: bool = False) -> np.ndarray:
        """[N, 2] log-probs of the two option tokens after each prompt."""
        bar = tqdm(total=len(prompts), desc="feedback", unit="prompt", disable=not progress, leave=False)
        logp_rows = batched_forward(functools.partial(self._forward, self.params), prompts,
                                    batch_size=self.batch_size, min_width=self.min_bucket,
                                    max_width=self.max_len, pad_id=self.pad_id, left=True,
                                    mesh=self.mesh, on_batch=bar.update)
        bar.close()
        return np.asarray(logp_rows, np.float64).reshape(len(prompts), 2)

    def p_first(self, prompts: Sequence[Sequence[int]], progress: bool = False) -> np.ndarray:
        """Softmax over the two option log-probs: p(option A) per prompt."""
        logp = self.option_logprobs(prompts, progress)
        return 1.0 / (1.0 + np.exp(logp[:, 1] - logp[:, 0]))


# ------------------------------------------------------------ ensembling

def combine_orders(p_first_ab, p_first_ba=None) -> np.ndarray:
    """p(answer_a better) from the first-slot probabilities of both orders.

    In order (a, b) the first slot holds answer_a; in order (b, a) answer_a is
    second, so its probability there is 1 - p_first_ba.
    """
    p_ab = np.asarray(p_first_ab, np.float64)
    if p_first_ba is None:
        return p_ab
    return (p_ab + (1.0 - np.asarray(p_first_ba, np.float64))) / 2.0


def clamp(p, low: float, high: float) -> np.ndarray:
    if not 0.0 <= low <= 0.5 <= high <= 1.0:
        raise ValueError(f"feedback.cot_clamp_low/high = {low}/{high}; need 0 <= low <= 0.5 <= high <= 1")
    return np.clip(np.asarray(p, np.float64), low, high)


def binary_entropy_bits(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def label_summary(records: Sequence[dict]) -> dict:
    """Position bias, agreement across principles, label entropy, and counts."""
    if not records:
        return {"labels": 0}
    firsts = [p for r in records for p in r["p_first_ab"] + r.get("p_first_ba", [])]
    agree = [np.all(np.asarray(r["p_a_per_principle"]) > 0.5) or np.all(np.asarray(r["p_a_per_principle"]) < 0.5)
             for r in records]
    p_a = np.asarray([r["p_a"] for r in records])
    out = {
        "labels": len(records),
        "harmless": sum(r["kind"] == "harmless" for r in records),
        "helpful": sum(r["kind"] == "helpful" for r in records),
        # Mean probability given to whatever sits in slot (A); 0.5 is unbiased.
        "position_bias": float(np.mean(firsts)),
        "principle_agreement": float(np.mean(agree)),
        "label_entropy_bits": float(np.mean(binary_entropy_bits(p_a))),
        "mean_p_a": float(np.mean(p_a)),
        "truncated": int(sum(r.get("truncated", 0) > 0 for r in records)),
    }
    return out


# ------------------------------------------------------------ the labeller

@dataclasses.dataclass(frozen=True)
class FeedbackComparison:
    """Two answers to one conversation (which ends with the human's turn)."""
    id: str
    kind: str  # "harmless" or "helpful"
    conversation: Conversation
    answer_a: str
    answer_b: str
    # False: the answer was cut at max_new_tokens (it has no end-of-turn token).
    complete_a: bool = True
    complete_b: bool = True


@dataclasses.dataclass
class _Query:
    comparison: int  # index into the chunk
    principle: int  # index into that comparison's principles
    swapped: bool
    ids: list[int]
    truncated: bool
    reasoning: str = ""


class FeedbackLabeler:
    """Soft labels p(answer_a better) from a language model under a constitution."""

    def __init__(self, model: LoadedModel, constitution: Constitution, *, style: str = "chat",
                 num_principles: int = 2, both_orders: bool = True, num_exemplars: int = -1,
                 chain_of_thought: bool = False, cot_clamp: tuple[float, float] = (0.4, 0.6),
                 cot_max_new_tokens: int = 128, cot_temperature: float = 1.0, cot_top_p: float = 0.95,
                 seed: int = 0, batch_size: int = 8, max_len: int = 1024, min_bucket: int = 128,
                 mesh=None):
        if model.tokenizer is None:
            raise ValueError(f"feedback model {model.source!r} has no tokenizer")
        if num_principles < 1:
            raise ValueError(f"feedback.num_principles must be >= 1, got {num_principles}")
        self.tokenizer, self.style, self.seed = model.tokenizer, style, seed
        self.constitution = constitution
        self.num_principles, self.both_orders = num_principles, both_orders
        self.chain_of_thought = chain_of_thought
        self.cot_clamp = cot_clamp
        clamp(0.5, *cot_clamp)  # validate the bounds now, not after an hour of labelling
        self.cot_max_new_tokens = cot_max_new_tokens
        self.cot_temperature, self.cot_top_p = cot_temperature, cot_top_p
        self.max_len = min(max_len, model.config.max_seq_len)
        self.shots = fp.exemplar_shots(constitution.feedback_exemplars, num_exemplars)
        cot = list(constitution.cot_feedback_exemplars)
        self.cot_exemplars = cot if num_exemplars < 0 else cot[:num_exemplars]
        self.prefix_ids, token_a, token_b = option_token_ids(self.tokenizer)
        self.scorer = OptionScorer(model.config, model.params, token_a, token_b,
                                   pad_id=pad_token_id(self.tokenizer),
                                   batch_size=batch_size, max_len=self.max_len, min_bucket=min_bucket,
                                   mesh=mesh)
        self._model = model
        self._sampler = None
        self.batch_size = batch_size

    # -- principles

    def principles_for(self, comparison: FeedbackComparison) -> list[FeedbackPrinciple]:
        if comparison.kind == "harmless":
            pool, kind = self.constitution.feedback, "feedback"
        elif comparison.kind == "helpful":
            pool, kind = self.constitution.helpfulness_feedback, "helpfulness_feedback"
            if not pool:
                # The paper's files have one list of principles (some of them about
                # helpfulness); use it rather than refusing to label.
                pool, kind = self.constitution.feedback, "feedback"
        else:
            raise ValueError(f"comparison {comparison.id}: kind is {comparison.kind!r}, one of {KINDS}")
        return sample_principles(pool, min(self.num_principles, len(pool)), seed=self.seed,
                                 example_id=comparison.id, kind=kind)

    # -- prompts

    def _fit(self, build, conversation: Conversation, budget: int) -> tuple[list[int], bool]:
        """Token ids of the prompt within `budget` tokens.

        Too long: drop few-shot exemplars (last first), then the oldest turns of
        the conversation (it keeps starting with a human turn); as a last resort
        keep only the prompt's final `budget` tokens (marked truncated).
        """
        n_shots = len(self.shots) if not self.chain_of_thought else len(self.cot_exemplars)
        conv = tuple(conversation)
        ids = encode(self.tokenizer, build(conv, n_shots))
        while len(ids) > budget and n_shots > 0:
            n_shots -= 1
            ids = encode(self.tokenizer, build(conv, n_shots))
        while len(ids) > budget and len(conv) > 1:
            conv = conv[1:]
            while len(conv) > 1 and conv[0].role != "user":
                conv = conv[1:]
            ids = encode(self.tokenizer, build(conv, n_shots))
        if len(ids) > budget:
            return ids[len(ids) - budget:], True
        return ids, conv != tuple(conversation)

    def _queries(self, comparisons: Sequence[FeedbackComparison]) -> tuple[list[_Query], list[list]]:
        queries, principles = [], []
        orders = (False, True) if self.both_orders else (False,)
        for ci, c in enumerate(comparisons):
            chosen = self.principles_for(c)
            principles.append(chosen)
            for pi, principle in enumerate(chosen):
                for swapped in orders:
                    a, b = (c.answer_b, c.answer_a) if swapped else (c.answer_a, c.answer_b)
                    if self.chain_of_thought:
                        def build(conv, n, a=a, b=b, text=principle.text):
                            return fp.build_cot_prompt(conv, text, a, b, exemplars=self.cot_exemplars[:n],
                                                       style=self.style, tokenizer=self.tokenizer)
                        # Room for the reasoning, the answer cue and the option prefix.
                        budget = self.max_len - self.cot_max_new_tokens - 16
                    else:
                        def build(conv, n, a=a, b=b, text=principle.text):
                            return fp.build_choice_prompt(conv, text, a, b, shots=self.shots[:n],
                                                          style=self.style, tokenizer=self.tokenizer)
                        budget = self.max_len - len(self.prefix_ids)
                    ids, truncated = self._fit(build, c.conversation, budget)
                    queries.append(_Query(ci, pi, swapped, ids, truncated))
        return queries, principles

    def _get_sampler(self):
        if self._sampler is None:
            from cai_jax.inference.sampling import Sampler
            self._sampler = Sampler(self._model.config, self.tokenizer, mesh=self.scorer.mesh,
                                    progress=False)
        return self._sampler

    def _reason(self, queries: list[_Query], comparisons: Sequence[FeedbackComparison]) -> None:
        """Samples each chain-of-thought reasoning and turns the query into the
        answer prompt that follows it."""
        from cai_jax.inference.sampling import SamplingParams

        sampler = self._get_sampler()
        params = SamplingParams(temperature=self.cot_temperature, top_k=0, top_p=self.cot_top_p,
                                max_new_tokens=self.cot_max_new_tokens,
                                stop_strings=fp.cot_stop_strings(self.style))
        ids = [q.ids for q in queries]
        example_ids = [f"{comparisons[q.comparison].id}/{q.principle}/{'ba' if q.swapped else 'ab'}"
                       for q in queries]
        samples = sampler.generate(self.scorer.params, ids, params, seed=self.seed,
                                   example_ids=example_ids, batch_size=self.batch_size)
        budget = self.scorer.max_len - len(self.prefix_ids)
        for q, sample in zip(queries, samples):
            q.reasoning = cut_at_stops(sample.text, fp.cot_stop_strings(self.style)).strip()
            # Extend the very ids the reasoning was sampled after.
            ids = q.ids + encode(self.tokenizer, fp.cot_answer_suffix(q.reasoning))
            if len(ids) > budget:
                ids, q.truncated = ids[len(ids) - budget:], True
            q.ids = ids

    # -- labels

    def label(self, comparisons: Sequence[FeedbackComparison], progress: bool = False) -> list[dict]:
        """One record per comparison:

            id, kind, p_a                 p(answer_a better), the ensembled label
            principle_ids                 the K principles drawn for it
            p_first_ab[k], p_first_ba[k]  p(slot A) under principle k with the
                                          answers in order (a, b) and (b, a)
            p_a_per_principle[k]          (p_first_ab + 1 - p_first_ba) / 2
            truncated                     prompts that had to be shortened
            cot[k] = {"ab", "ba"}         the reasoning texts (chain of thought)
        """
        queries, principles = self._queries(comparisons)
        if self.chain_of_thought:
            self._reason(queries, comparisons)
        p_first = self.scorer.p_first([q.ids + self.prefix_ids for q in queries], progress=progress)
        if self.chain_of_thought:
            p_first = clamp(p_first, *self.cot_clamp)
        ab = [[0.0] * len(chosen) for chosen in principles]
        ba = [[0.0] * len(chosen) for chosen in principles]
        cot = [[{} for _ in chosen] for chosen in principles]
        truncated = [0] * len(comparisons)
        for q, p in zip(queries, p_first):
            (ba if q.swapped else ab)[q.comparison][q.principle] = float(p)
            cot[q.comparison][q.principle]["ba" if q.swapped else "ab"] = q.reasoning
            truncated[q.comparison] += q.truncated
        records = []
        for ci, c in enumerate(comparisons):
            per_principle = combine_orders(ab[ci], ba[ci] if self.both_orders else None)
            record = {"id": c.id, "kind": c.kind, "p_a": float(np.mean(per_principle)),
                      "principle_ids": [p.id for p in principles[ci]],
                      "p_a_per_principle": [float(x) for x in per_principle],
                      "p_first_ab": ab[ci], "truncated": truncated[ci]}
            if self.both_orders:
                record["p_first_ba"] = ba[ci]
            if self.chain_of_thought:
                record["cot"] = cot[ci]
            records.append(record)
        return records


# ------------------------------------------------------------ from config

def labeler_from_config(config, workdir: Optional[str] = None, model: Optional[LoadedModel] = None,
                        mesh=None) -> FeedbackLabeler:
    section = config.feedback
    if model is None:
        model = resolve(section.model_source, config, workdir).load(seed=config.seed)
    if mesh is None and "mesh" in config:
        mesh = shd.make_mesh(config.mesh.to_dict())
    return FeedbackLabeler(
        model, constitution_from_config(config.constitution, config.seed), style=config.data.render,
        num_principles=section.num_principles, both_orders=section.both_orders,
        num_exemplars=section.num_exemplars, chain_of_thought=section.chain_of_thought,
        cot_clamp=(section.cot_clamp_low, section.cot_clamp_high),
        cot_max_new_tokens=section.cot_max_new_tokens, cot_temperature=section.cot_temperature,
        cot_top_p=section.cot_top_p, seed=config.seed, batch_size=section.batch_size,
        max_len=section.max_seq_len, min_bucket=section.min_bucket, mesh=mesh)


def comparisons_from_pairs(records: Sequence[dict],
                           path: str = "pairs.jsonl") -> list[FeedbackComparison]:
    """pairs.jsonl records -> FeedbackComparisons, with errors naming the record."""
    out = []
    for i, r in enumerate(records, 1):
        try:
            out.append(FeedbackComparison(str(r["id"]), r["kind"], as_conversation(r["prompt"]),
                                          r["answer_a"], r["answer_b"],
                                          complete_a=r.get("finish_a") != "length",
                                          complete_b=r.get("finish_b") != "length"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} record {i}: {e!r}; expected id, kind, prompt (list of turns), "
                             "answer_a, answer_b") from None
        if out[-1].kind not in KINDS:
            raise ValueError(f"{path} record {i}: kind is {out[-1].kind!r}, one of {KINDS}")
    return out


def label_record(c: FeedbackComparison, label: dict) -> dict:
    """A labels.jsonl record: the label plus what preference training needs of the pair."""
    return {**label, "conversation": to_messages(c.conversation), "answer_a": c.answer_a,
            "answer_b": c.answer_b, "complete_a": c.complete_a, "complete_b": c.complete_b}


def run_stage(ctx) -> dict:
    config = ctx.config
    section = config.feedback
    pairs_path = ctx.path("pairs.jsonl")
    comparisons = comparisons_from_pairs(artifacts.read_jsonl(pairs_path), pairs_path)
    if section.limit:
        comparisons = comparisons[:section.limit]
    out = artifacts.PartialJsonl(ctx.path("labels.jsonl"))
    done = out.done_keys()
    todo = [c for c in comparisons if c.id not in done]
    if todo:
        labeler = labeler_from_config(config, ctx.workdir)
        # Chunks of a few batches: each finished chunk is saved, so a kill loses little.
        per_chunk = max(1, 4 * section.batch_size // (2 * section.num_principles))
        bar = tqdm(total=len(comparisons), initial=len(comparisons) - len(todo), desc="feedback",
                   disable=not ctx.progress)
        for chunk in artifacts.iter_batches(todo, per_chunk):
            out.extend(label_record(c, r) for c, r in zip(chunk, labeler.label(chunk)))
            bar.update(len(chunk))
        bar.close()
    records = out.finish(order=[c.id for c in comparisons])
    summary = label_summary(records)
    summary["chain_of_thought"] = bool(section.chain_of_thought)
    return summary
