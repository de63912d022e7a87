"""AI feedback (stage `feedback`): soft labels for pairs of answers.

`feedback.source` picks where a label comes from:

* "multiple_choice" (the paper, below): a feedback model judges each pair.
* "pointwise": a feedback model judges each answer alone under each drawn
  principle, "is this reply a bad one by the principle's question? Yes or
  No"; an answer's score is log p(No) - log p(Yes) at the answer position,
  averaged over the K principles, and the label is
  sigmoid(score_a - score_b). One answer per prompt: no slot to be biased
  towards, no long two-answer prompt, and swapping the answers gives 1 - p.
* "construction": no judge. Pairs made by `pairs.mode="contrastive"` record
  which answer was made under the better framing; its label is
  `construction_confidence` (0.9: soft, since a framing makes the better
  answer only on average). On such pairs a multiple-choice judge's agreement
  with the construction is reported too, an independent check of the judge.

Every record names its source. In multiple choice, the feedback model reads
a question for each pair (see feedback_prompts.py) and the label is the softmax over the log-probabilities
of the two option tokens at the answer position: one batched forward pass, no
sampling. SmolLM2 splits " (A)" into " (", "A", ")"; the shared prefix " (" is
appended to the prompt and the first differing tokens ("A" / "B") compared.

The option mass, the probability of the two option tokens together at the
answer position, is recorded per label: a model that puts little mass there is
not answering the question it is asked (or is broken).

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
from typing import Optional, Sequence

import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from cai_jax import artifacts, processes
from cai_jax.inference import prefix_groups
from cai_jax.inference.option_scorer import OptionScorer, option_token_ids, p_first_and_mass
from cai_jax.constitution import (Constitution, FeedbackPrinciple, constitution_from_config,
                                  sample_principles)
from cai_jax.data.conversation import Conversation, as_conversation, to_messages
from cai_jax.model_ref import resolve
from cai_jax.rl_cai import feedback_prompts as fp
from cai_jax.stats import sigmoid
from cai_jax.weights.loader import LoadedModel
from cai_jax.inference.sampling_buckets import cut_at_stops
from cai_jax.weights.tokenizer import encode_text

KINDS = ("harmless", "helpful")
SOURCES = ("multiple_choice", "pointwise", "construction")


def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Where labels come from: "multiple_choice" (a model judges each pair, as
        # in the paper), "pointwise" (a model judges each answer alone, Yes/No
        # under each principle; label = sigmoid of the score difference) or
        # "construction" (no judge: pairs made by pairs.mode="contrastive" are
        # labelled by the framing each answer was made under).
        "source": "multiple_choice",
        # construction: p(the answer made under the better framing is better).
        # Below 1 softens labels that are right only on average.
        "construction_confidence": 0.9,
        # "base": config.model (the pretrained model, as in the paper);
        # or any other model reference (cai_jax/model_ref.py: sl_cai, ckpt:DIR, ...).
        "model_source": "base",
        # Principles drawn per comparison (capped by how many the constitution
        # has); multiple choice and pointwise draw the same ones.
        "num_principles": 2,
        # Ask each principle with the answers in both orders to cancel position
        # bias (multiple choice; pointwise shows one answer at a time).
        "both_orders": True,
        # Few-shot exemplars from the constitution (-1: all, 0: none).
        "num_exemplars": -1,
        # Reason first, then answer (multiple choice only). Its exemplars are the constitution's
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
        # Compute the start that a comparison's questions share (exemplars,
        # conversation) once, and only the differing ends per question; the same
        # labels within float rounding (inference/prefix_groups.py).
        "shared_prefix": True,
        "max_seq_len": 1024,
        "min_bucket": 128,
        # Label only the first `limit` pairs (0: all).
        "limit": 0,
    })


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


def pointwise_p_a(scores_a, scores_b) -> float:
    """p(answer_a better) from the answers' per-principle pointwise scores
    (log p(No) - log p(Yes)): sigmoid of the difference of their means."""
    return float(sigmoid(np.mean(np.asarray(scores_a, np.float64)) - np.mean(np.asarray(scores_b, np.float64))))


def label_summary(records: Sequence[dict]) -> dict:
    """Counts and label entropy; for judged labels also agreement across
    principles and option mass, and for multiple choice position bias; where
    pairs were made by construction, how often the labels agree with it."""
    if not records:
        return {"labels": 0}
    p_a = np.asarray([r["p_a"] for r in records])
    out = {
        "labels": len(records),
        "harmless": sum(r["kind"] == "harmless" for r in records),
        "helpful": sum(r["kind"] == "helpful" for r in records),
        "label_entropy_bits": float(np.mean(binary_entropy_bits(p_a))),
        "mean_p_a": float(np.mean(p_a)),
    }
    judged = [r for r in records if "p_a_per_principle" in r]
    if judged:
        agree = [np.all(np.asarray(r["p_a_per_principle"]) > 0.5)
                 or np.all(np.asarray(r["p_a_per_principle"]) < 0.5) for r in judged]
        firsts = [p for r in judged for p in r.get("p_first_ab", []) + r.get("p_first_ba", [])]
        if firsts:
            # Mean probability given to whatever sits in slot (A); 0.5 is unbiased.
            out["position_bias"] = float(np.mean(firsts))
        out["principle_agreement"] = float(np.mean(agree))
        out["truncated"] = int(sum(r.get("truncated", 0) > 0 for r in judged))
        masses = [r["option_mass"] for r in judged if "option_mass" in r]
        if masses:
            out["option_mass"] = float(np.mean(masses))
            out["option_mass_below_half"] = int(sum(m < 0.5 for m in masses))
        built = [r for r in judged if r.get("construction")]
        if built:
            # An independent check of the judge: does it prefer the answer made
            # under the better framing?
            out["agreement_with_construction"] = float(np.mean(
                [(r["p_a"] > 0.5) == (r["construction"]["better"] == "a") for r in built]))
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
    # How a contrastive pair was made: {"framing": id, "better": "a" | "b"}.
    construction: Optional[dict] = None


@dataclasses.dataclass
class _Query:
    comparison: int  # index into the chunk
    principle: int  # index into that comparison's principles
    swapped: bool
    ids: list[int]
    truncated: bool
    reasoning: str = ""


class FeedbackLabeler:
    """Soft labels p(answer_a better) from a language model under a constitution,
    by multiple choice (the paper's format)."""

    options = fp.OPTIONS

    def __init__(self, model: LoadedModel, constitution: Constitution, *, style: str = "chat",
                 num_principles: int = 2, both_orders: bool = True, num_exemplars: int = -1,
                 chain_of_thought: bool = False, cot_clamp: tuple[float, float] = (0.4, 0.6),
                 cot_max_new_tokens: int = 128, cot_temperature: float = 1.0, cot_top_p: float = 0.95,
                 seed: int = 0, batch_size: int = 8, max_len: int = 1024, min_bucket: int = 128,
                 shared_prefix: bool = True, mesh: Mesh):
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
        self.prefix_ids, token_a, token_b = option_token_ids(self.tokenizer, self.options)
        self.scorer = OptionScorer(model.config, model.params, token_a, token_b,
                                   batch_size=batch_size, max_len=self.max_len, min_bucket=min_bucket,
                                   mesh=mesh)
        self.shared_prefix = shared_prefix
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
        ids = encode_text(self.tokenizer, build(conv, n_shots))
        while len(ids) > budget and n_shots > 0:
            n_shots -= 1
            ids = encode_text(self.tokenizer, build(conv, n_shots))
        while len(ids) > budget and len(conv) > 1:
            conv = conv[1:]
            while len(conv) > 1 and conv[0].role != "user":
                conv = conv[1:]
            ids = encode_text(self.tokenizer, build(conv, n_shots))
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
                                    progress=False, shared_prefix=self.shared_prefix)
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
            ids = q.ids + encode_text(self.tokenizer, fp.cot_answer_suffix(q.reasoning))
            if len(ids) > budget:
                ids, q.truncated = ids[len(ids) - budget:], True
            q.ids = ids

    # -- labels

    def _option_logprobs(self, queries: list[_Query], comparisons: Sequence[FeedbackComparison],
                         principles: list[list], progress: bool) -> np.ndarray:
        """[N, 2] option log-probs of the queries. With shared_prefix, the
        queries that share a start are scored together, grouped by whichever
        leaves least to compute: per comparison and principle (exemplars,
        conversation and principle shared), per principle (its exemplars shared
        across comparisons) or per comparison (the conversation shared)."""
        rows = [q.ids + self.prefix_ids for q in queries]
        keys = None
        if self.shared_prefix:
            keys = prefix_groups.pick_keys(rows, [
                [(q.comparison, q.principle) for q in queries],
                [(comparisons[q.comparison].kind, principles[q.comparison][q.principle].id) for q in queries],
                [q.comparison for q in queries]])
        return self.scorer.option_logprobs(rows, progress=progress, keys=keys)

    def label(self, comparisons: Sequence[FeedbackComparison], progress: bool = False) -> list[dict]:
        """One record per comparison:

            id, kind, p_a                 p(answer_a better), the ensembled label
            principle_ids                 the K principles drawn for it
            p_first_ab[k], p_first_ba[k]  p(slot A) under principle k with the
                                          answers in order (a, b) and (b, a)
            p_a_per_principle[k]          (p_first_ab + 1 - p_first_ba) / 2
            truncated                     prompts that had to be shortened
            option_mass                   mean probability of the two option tokens
                                          together at the answer position
            cot[k] = {"ab", "ba"}         the reasoning texts (chain of thought)
        """
        queries, principles = self._queries(comparisons)
        if self.chain_of_thought:
            self._reason(queries, comparisons)
        p_first, mass = p_first_and_mass(self._option_logprobs(queries, comparisons, principles, progress))
        if self.chain_of_thought:
            p_first = clamp(p_first, *self.cot_clamp)
        ab = [[0.0] * len(chosen) for chosen in principles]
        ba = [[0.0] * len(chosen) for chosen in principles]
        cot = [[{} for _ in chosen] for chosen in principles]
        truncated = [0] * len(comparisons)
        masses = [[] for _ in comparisons]
        for q, p, m in zip(queries, p_first, mass):
            masses[q.comparison].append(float(m))
            (ba if q.swapped else ab)[q.comparison][q.principle] = float(p)
            cot[q.comparison][q.principle]["ba" if q.swapped else "ab"] = q.reasoning
            truncated[q.comparison] += q.truncated
        records = []
        for ci, c in enumerate(comparisons):
            per_principle = combine_orders(ab[ci], ba[ci] if self.both_orders else None)
            record = {"id": c.id, "kind": c.kind, "p_a": float(np.mean(per_principle)),
                      "principle_ids": [p.id for p in principles[ci]],
                      "p_a_per_principle": [float(x) for x in per_principle],
                      "p_first_ab": ab[ci], "truncated": truncated[ci],
                      "option_mass": float(np.mean(masses[ci])), "source": "multiple_choice"}
            if self.both_orders:
                record["p_first_ba"] = ba[ci]
            if self.chain_of_thought:
                record["cot"] = cot[ci]
            records.append(record)
        return records


# ------------------------------------------------------------ from config

class PointwiseLabeler(FeedbackLabeler):
    """Soft labels from judging each answer alone (feedback.source="pointwise").

    Under each of the K principles drawn for a comparison (the same draw as
    multiple choice), the model says whether the answer is a bad one by the
    principle's question (feedback_prompts.build_pointwise_prompt). The
    answer's score under that principle is log p(No) - log p(Yes) at the
    answer position; its score is the mean over the K principles, and
    p(answer_a better) = sigmoid(score_a - score_b).
    """

    options = fp.POINTWISE_OPTIONS

    def __init__(self, model: LoadedModel, constitution: Constitution, *, num_exemplars: int = -1,
                 chain_of_thought: bool = False, both_orders: bool = True, **kwargs):
        if chain_of_thought:
            raise ValueError("feedback.chain_of_thought works with source='multiple_choice' only, "
                             "not 'pointwise'")
        # both_orders is moot: each prompt holds one answer.
        super().__init__(model, constitution, num_exemplars=num_exemplars, both_orders=False, **kwargs)
        self.shots = fp.pointwise_shots(constitution.feedback_exemplars, num_exemplars)

    def _queries(self, comparisons: Sequence[FeedbackComparison]) -> tuple[list[_Query], list[list]]:
        """Two queries per (comparison, principle): `swapped` marks the one about answer_b."""
        queries, principles = [], []
        budget = self.max_len - len(self.prefix_ids)
        for ci, c in enumerate(comparisons):
            chosen = self.principles_for(c)
            principles.append(chosen)
            for pi, principle in enumerate(chosen):
                for is_b, answer in ((False, c.answer_a), (True, c.answer_b)):
                    def build(conv, n, answer=answer, text=principle.text):
                        return fp.build_pointwise_prompt(conv, text, answer, shots=self.shots[:n],
                                                         style=self.style, tokenizer=self.tokenizer)
                    ids, truncated = self._fit(build, c.conversation, budget)
                    queries.append(_Query(ci, pi, is_b, ids, truncated))
        return queries, principles

    def label(self, comparisons: Sequence[FeedbackComparison], progress: bool = False) -> list[dict]:
        """One record per comparison:

            id, kind, p_a                 sigmoid(score_a - score_b)
            principle_ids                 the K principles drawn for it
            score_a_per_principle[k]      log p(No) - log p(Yes) for answer_a under
            score_b_per_principle[k]      principle k (and for answer_b)
            score_a, score_b              their means over the K principles
            p_a_per_principle[k]          sigmoid(score_a[k] - score_b[k])
            truncated                     prompts that had to be shortened
            option_mass                   mean p(Yes) + p(No) at the answer position
        """
        queries, principles = self._queries(comparisons)
        logp_n2 = self._option_logprobs(queries, comparisons, principles, progress)
        score_n = logp_n2[:, 1] - logp_n2[:, 0]  # log p(No) - log p(Yes)
        mass_n = np.exp(logp_n2).sum(axis=1)
        scores = [[[0.0, 0.0] for _ in chosen] for chosen in principles]
        truncated = [0] * len(comparisons)
        masses = [[] for _ in comparisons]
        for q, score, mass in zip(queries, score_n, mass_n):
            scores[q.comparison][q.principle][int(q.swapped)] = float(score)
            masses[q.comparison].append(float(mass))
            truncated[q.comparison] += q.truncated
        records = []
        for ci, c in enumerate(comparisons):
            score_a, score_b = ([s[0] for s in scores[ci]], [s[1] for s in scores[ci]])
            records.append({
                "id": c.id, "kind": c.kind, "p_a": pointwise_p_a(score_a, score_b),
                "principle_ids": [p.id for p in principles[ci]],
                "score_a_per_principle": score_a, "score_b_per_principle": score_b,
                "score_a": float(np.mean(score_a)), "score_b": float(np.mean(score_b)),
                "p_a_per_principle": [float(x) for x in sigmoid(np.subtract(score_a, score_b))],
                "truncated": truncated[ci], "option_mass": float(np.mean(masses[ci])),
                "source": "pointwise"})
        return records


def labeler_from_config(config, workdir: Optional[str] = None, model: Optional[LoadedModel] = None,
                        *, mesh: Mesh) -> FeedbackLabeler:
    """The judge feedback.source names: multiple choice (also for "construction",
    whose stage needs no judge but whose callers may want one) or pointwise,
    on `mesh` (the run's: sharding.mesh_from_config(config))."""
    section = config.feedback
    if model is None:
        model = resolve(section.model_source, config, workdir).load(seed=config.seed, mesh=mesh)
    kind = PointwiseLabeler if section.source == "pointwise" else FeedbackLabeler
    return kind(
        model, constitution_from_config(config.constitution, config.seed), style=config.data.render,
        num_principles=section.num_principles, both_orders=section.both_orders,
        num_exemplars=section.num_exemplars, chain_of_thought=section.chain_of_thought,
        cot_clamp=(section.cot_clamp_low, section.cot_clamp_high),
        cot_max_new_tokens=section.cot_max_new_tokens, cot_temperature=section.cot_temperature,
        cot_top_p=section.cot_top_p, seed=config.seed, batch_size=section.batch_size,
        max_len=section.max_seq_len, min_bucket=section.min_bucket,
        shared_prefix=section.get("shared_prefix", True), mesh=mesh)


def comparisons_from_pairs(records: Sequence[dict],
                           path: str = "pairs.jsonl") -> list[FeedbackComparison]:
    """pairs.jsonl records -> FeedbackComparisons, with errors naming the record."""
    out = []
    for i, r in enumerate(records, 1):
        try:
            out.append(FeedbackComparison(str(r["id"]), r["kind"], as_conversation(r["prompt"]),
                                          r["answer_a"], r["answer_b"],
                                          complete_a=r.get("finish_a") != "length",
                                          complete_b=r.get("finish_b") != "length",
                                          construction=r.get("construction")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} record {i}: {e!r}; expected id, kind, prompt (list of turns), "
                             "answer_a, answer_b") from None
        if out[-1].kind not in KINDS:
            raise ValueError(f"{path} record {i}: kind is {out[-1].kind!r}, one of {KINDS}")
    return out


def label_record(c: FeedbackComparison, label: dict) -> dict:
    """A labels.jsonl record: the label plus what preference training needs of the pair."""
    record = {**label, "conversation": to_messages(c.conversation), "answer_a": c.answer_a,
              "answer_b": c.answer_b, "complete_a": c.complete_a, "complete_b": c.complete_b}
    if c.construction:
        record["construction"] = c.construction
    return record


def construction_label(c: FeedbackComparison, confidence: float, path: str = "pairs.jsonl") -> dict:
    """The label a contrastive pair carries by how it was made: no judge."""
    if not c.construction:
        raise ValueError(f"{path} pair {c.id}: feedback.source='construction' needs pairs made with "
                         "pairs.mode='contrastive' (this pair has no 'construction')")
    p_a = confidence if c.construction["better"] == "a" else 1.0 - confidence
    return {"id": c.id, "kind": c.kind, "p_a": p_a, "source": "construction"}


def check_section(section) -> None:
    if section.source not in SOURCES:
        raise ValueError(f"feedback.source must be one of {SOURCES}, got {section.source!r}")
    if not 0.5 <= section.construction_confidence <= 1.0:
        raise ValueError(f"feedback.construction_confidence must be in [0.5, 1], "
                         f"got {section.construction_confidence}")
    clamp(0.5, section.cot_clamp_low, section.cot_clamp_high)
    if section.source == "pointwise" and section.chain_of_thought:
        raise ValueError("feedback.chain_of_thought=True works with feedback.source='multiple_choice' "
                         "only; set it False for source='pointwise'")


def run_stage(ctx) -> dict:
    config = ctx.config
    section = config.feedback
    check_section(section)
    pairs_path = ctx.path("pairs.jsonl")
    comparisons = comparisons_from_pairs(artifacts.read_jsonl(pairs_path), pairs_path)
    if section.limit:
        comparisons = comparisons[:section.limit]
    out = processes.open_records(ctx.path("labels.jsonl"))
    done = out.done_keys()
    todo = [c for c in comparisons if c.id not in done]
    if todo and section.source == "construction":
        out.extend(label_record(c, construction_label(c, section.construction_confidence, pairs_path))
                   for c in todo)
    elif todo:
        labeler = labeler_from_config(config, ctx.workdir, mesh=ctx.mesh)
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
    summary["source"] = section.source
    if section.source == "multiple_choice":
        summary["chain_of_thought"] = bool(section.chain_of_thought)
    return summary
