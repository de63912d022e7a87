"""Judges: who decides which of two answers to the same prompt is better.

A judge turns comparisons (one prompt, the answers of two models) into
verdicts: the probability that model A's answer is the better one, once with
A's answer shown first and once with it shown second. The evaluation averages
the two, so a judge's preference for a slot cancels out. Three kinds:

* `PreferenceModelJudge`: a trained preference model scores each answer on
  its own; p(A beats B) = sigmoid(r_A - r_B). The PM never sees the two
  answers together, so both orders give the same number.
* `FeedbackJudge`: the AI feedback labeler (rl_cai/feedback.py) asks a
  multiple-choice question under principles drawn from one set of the
  constitution ("harmless" or "helpful"), in both orders (or, outside the
  evaluation, judges each answer alone: the pointwise labeler).
* `HumanLabelJudge`: labels read from a JSONL file, one line per judged
  pair: {"prompt_id", "model_a", "model_b", "p_a"} with p_a in [0, 1]
  (1: A's answer is better, 0.5: a tie). Several lines for one pair are
  averaged; a line for (B, A) counts as 1 - p_a for (A, B). Pairs without a
  label get no verdict and stay out of that judge's Elo.

The evaluation (evaluate.py) judges pairs of models' answers with them;
`tools/score_pairs.py` and the labels bench (benchmarks/bench_labels.py)
judge HH-RLHF pairs with the same two model judges, the chosen answer as A,
and take p(chosen better) = Verdict.outcome.

Judges are named by spec strings in the config (see `parse_judge_spec`):
"pm", "pm_judge", "pm:DIR", "feedback:harmless", "feedback:helpful",
"human:PATH", "none". "pm" is the preference model PPO maximised; "pm_judge"
is the run's second preference model, trained on the labels of prompts that
"pm" never saw (pm_train.judge_fraction), so PPO never optimised against it.
Every judge has a `version` that changes when its weights or labels do;
cached judgments carry it, so a retrained PM is asked again.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Protocol, Sequence

import numpy as np

from cai_jax import artifacts
from cai_jax.data.conversation import Conversation
from cai_jax.stats import sigmoid

PRINCIPLE_SETS = ("harmless", "helpful")


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """The answers of two models to one prompt."""

    prompt_id: str
    conversation: Conversation  # the prompt, ending with the human's turn
    model_a: str
    model_b: str
    answer_a: str
    answer_b: str
    # Names the comparison where prompt and models do not (score_pairs: an HH
    # pair's "file:line"). The feedback judge draws its principles by `id`.
    comparison_id: str = ""

    @property
    def id(self) -> str:
        return self.comparison_id or f"{self.prompt_id}|{self.model_a}|{self.model_b}"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """p(A's answer is better) with A's answer shown first (p_ab) and second (p_ba)."""

    p_ab: float
    p_ba: float

    @property
    def outcome(self) -> float:
        return 0.5 * (self.p_ab + self.p_ba)


class Judge(Protocol):
    name: str  # the spec it was built from, e.g. "pm" or "feedback:helpful"
    version: str  # changes with the judge's weights or labels

    def judge(self, comparisons: Sequence[ModelComparison]) -> list[Optional[Verdict]]:
        ...


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    kind: str  # "pm" | "feedback" | "human" | "none"
    arg: str = ""  # PM directory, principle set, or labels path ("" = default)
    run_model: str = "pm"  # for kind "pm" without a directory: the run's "pm" or "pm_judge"


def parse_judge_spec(spec: str, key: str = "eval judge") -> JudgeSpec:
    """"pm" | "pm_judge" | "pm:DIR" | "feedback:harmless" | "feedback:helpful" |
    "human:PATH" | "none"."""
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return JudgeSpec("none")
    if kind == "pm":
        return JudgeSpec("pm", arg)
    if spec == "pm_judge":
        return JudgeSpec("pm", run_model="pm_judge")
    if kind == "feedback" and arg in PRINCIPLE_SETS:
        return JudgeSpec("feedback", arg)
    if kind == "human" and arg:
        return JudgeSpec("human", arg)
    raise ValueError(f"{key} is {spec!r}; use 'pm', 'pm_judge', 'pm:DIR', 'feedback:harmless', "
                     "'feedback:helpful', 'human:PATH' or 'none'")


class PreferenceModelJudge:
    """p(A beats B) = sigmoid(score(A) - score(B)) under a preference model.

    `scorer` is anything with `score(conversations, answers) -> [N] scores`
    (inference.preference_scorer.PreferenceScorer). Each distinct (prompt, answer) is
    scored once, however many comparisons it appears in.
    """

    def __init__(self, scorer, name: str = "pm", version: str = ""):
        self.scorer, self.name, self.version = scorer, name, version

    def judge(self, comparisons: Sequence[ModelComparison]) -> list[Optional[Verdict]]:
        keys, convs, answers = {}, [], []
        for c in comparisons:
            for answer in (c.answer_a, c.answer_b):
                key = (c.prompt_id, answer)
                if key not in keys:
                    keys[key] = len(answers)
                    convs.append(c.conversation)
                    answers.append(answer)
        scores = np.asarray(self.scorer.score(convs, answers), np.float64) if answers else np.zeros(0)
        out = []
        for c in comparisons:
            r_a, r_b = scores[keys[(c.prompt_id, c.answer_a)]], scores[keys[(c.prompt_id, c.answer_b)]]
            # The PM scores answers one at a time: showing B first changes nothing.
            out.append(Verdict(float(sigmoid(r_a - r_b)), float(1.0 - sigmoid(r_b - r_a))))
        return out


class FeedbackJudge:
    """The AI feedback labeler as a judge, under one set of principles.

    `labeler` is a rl_cai.feedback.FeedbackLabeler built with both_orders=True:
    each drawn principle is asked with the answers in both orders, and the
    verdict keeps the two orders apart (averaged over principles). With
    require_both_orders=False (score_pairs, which measures the labeler as the
    feedback stage is configured) it may also be one asked in one order, A
    first, or a PointwiseLabeler, which shows one answer at a time: either
    way its label p_a stands for both orders. `seconds` and `option_mass`
    (one per comparison) add up over the comparisons this judge labelled.
    """

    def __init__(self, labeler, principle_set: str, name: Optional[str] = None, version: str = "", *,
                 require_both_orders: bool = True, progress: bool = False):
        if principle_set not in PRINCIPLE_SETS:
            raise ValueError(f"principle set {principle_set!r}; one of {PRINCIPLE_SETS}")
        if require_both_orders and not getattr(labeler, "both_orders", True):
            raise ValueError("a FeedbackJudge needs a labeler built with both_orders=True")
        self.labeler, self.principle_set, self.progress = labeler, principle_set, progress
        self.name = name or f"feedback:{principle_set}"
        self.version = version
        self.seconds, self.option_mass = 0.0, []

    def judge(self, comparisons: Sequence[ModelComparison]) -> list[Optional[Verdict]]:
        from cai_jax.rl_cai import feedback

        # The labeler's kind picks the principle pool: "harmless" -> the
        # constitution's feedback principles, "helpful" -> its helpfulness ones.
        asks = [feedback.FeedbackComparison(c.id, self.principle_set, c.conversation, c.answer_a,
                                            c.answer_b) for c in comparisons]
        start = time.perf_counter()
        records = self.labeler.label(asks, progress=self.progress) if asks else []
        self.seconds += time.perf_counter() - start
        self.option_mass += [r["option_mass"] for r in records]
        return [self.verdict(r) for r in records]

    @staticmethod
    def verdict(record: dict) -> Verdict:
        """A labeler record's verdict: multiple choice asked in both orders keeps
        them apart; a label from one order or from pointwise scores stands for both."""
        if "p_first_ba" in record:
            return Verdict(float(np.mean(record["p_first_ab"])), float(1.0 - np.mean(record["p_first_ba"])))
        return Verdict(float(record["p_a"]), float(record["p_a"]))


class HumanLabelJudge:
    """Verdicts from human-labelled pairs (see the module docstring for the format)."""

    def __init__(self, path: str, name: Optional[str] = None):
        if not os.path.exists(path):
            raise FileNotFoundError(f"human labels {path} do not exist (eval judge 'human:{path}')")
        self.path, self.name = path, name or f"human:{path}"
        self.version = artifacts.file_hash(path)
        self.labels: dict[tuple[str, str, str], list[float]] = {}
        for line, r in enumerate(artifacts.read_jsonl(path), 1):
            missing = [k for k in ("prompt_id", "model_a", "model_b", "p_a") if k not in r]
            if missing:
                raise ValueError(f"{path} line {line}: missing {missing}; each line needs prompt_id, "
                                 "model_a, model_b and p_a")
            p = r["p_a"]
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{path} line {line}: 'p_a' is {p!r}, must be in [0, 1]")
            self.labels.setdefault((str(r["prompt_id"]), r["model_a"], r["model_b"]), []).append(float(p))

    def judge(self, comparisons: Sequence[ModelComparison]) -> list[Optional[Verdict]]:
        out = []
        for c in comparisons:
            votes = list(self.labels.get((c.prompt_id, c.model_a, c.model_b), []))
            votes += [1.0 - p for p in self.labels.get((c.prompt_id, c.model_b, c.model_a), [])]
            # The file does not say which answer the rater saw first.
            out.append(Verdict(float(np.mean(votes)), float(np.mean(votes))) if votes else None)
        return out
