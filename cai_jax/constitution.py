"""Constitutions: the principles that steer critiques, revisions and AI feedback.

A `Constitution` holds

* critique/revision request pairs (SL-CAI stage),
* multiple-choice feedback principles (RL-CAI stage), each a question whose
  text ends so that the options follow ("... Options:"), plus a few for
  labelling helpfulness comparisons,
* few-shot exemplars for both stages.

It can be read from the project's own JSON format (`load_constitution`, see
constitutions/README.md) or from the paper's supplementary prompt files
(`load_paper_prompts`), which keeps the paper's texts exactly.

Principles are sampled per example with `sample_principles`: the draw depends
only on (seed, example id, round), so it does not change with batch order,
sharding or restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
from typing import Any, Sequence, TypeVar

import numpy as np

from cai_jax.data.conversation import (
    ConversationFormatError,
    CritiqueRound,
    CritiqueTranscript,
    Turn,
    parse_critique_transcript,
    parse_hh,
    render_hh,
)
from cai_jax.errors import json_error_text


class ConstitutionError(ValueError):
    """A constitution file is malformed; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class CritiqueRevisionPair:
    id: str
    critique_request: str
    revision_request: str


@dataclasses.dataclass(frozen=True)
class FeedbackPrinciple:
    """A multiple-choice question; the answer options are appended after `text`."""
    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class ContrastiveFraming:
    """Two system messages that steer one model towards a better and a worse
    answer to the same prompt, for labels by construction (RLCD, Yang et al.
    2023): the answer made under `better` is labelled preferred, with no judge.
    `kind` is the comparison kind it makes pairs for ("harmless" or "helpful").
    `better_starts` / `worse_starts` (optional) are openings the answer is
    made to begin with, one drawn per prompt: a small model that ignores a
    system message still continues "I can't help with that. Instead," as a
    redirect, so the pair differs in the way the framing means."""
    id: str
    kind: str
    better: str
    worse: str
    better_starts: tuple[str, ...] = ()
    worse_starts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FeedbackExemplar:
    """A solved multiple-choice example, shaped like the paper's RLMadison files.

    `prompt` is the HH text of the conversation ending in "\\n\\nAssistant:";
    `corrects` are answers that should be chosen, `incorrects` ones that
    should not.
    """
    id: str
    prompt: str
    corrects: tuple[str, ...]
    incorrects: tuple[str, ...]

    def conversation(self) -> tuple[Turn, ...]:
        """The prompt as turns, without the empty generation-prompt turn."""
        turns = parse_hh(self.prompt)
        if turns and turns[-1].role == "assistant" and not turns[-1].content:
            turns = turns[:-1]
        return turns


@dataclasses.dataclass(frozen=True)
class ChainOfThoughtExemplar:
    """A solved multiple-choice example with written reasoning (paper's "Precog" file).

    `template` is the paper's text verbatim; it holds a "{}" slot where the
    principle goes, and ends with "So the answer is: (X)".
    """
    id: str
    template: str

    def render(self, principle_text: str) -> str:
        # Plain replace, not str.format: the transcripts may contain other braces.
        return self.template.replace("{}", principle_text, 1)

    @property
    def answer(self) -> str:
        match = re.search(r"So the answer is: \(([A-Z])\)\s*$", self.template)
        if not match:
            raise ConstitutionError(f"exemplar {self.id}: no final 'So the answer is: (X)'")
        return match.group(1)


@dataclasses.dataclass(frozen=True)
class Constitution:
    name: str
    critique_revision: tuple[CritiqueRevisionPair, ...]
    feedback: tuple[FeedbackPrinciple, ...]
    helpfulness_feedback: tuple[FeedbackPrinciple, ...] = ()
    critique_exemplars: tuple[CritiqueTranscript, ...] = ()
    feedback_exemplars: tuple[FeedbackExemplar, ...] = ()
    cot_feedback_exemplars: tuple[ChainOfThoughtExemplar, ...] = ()
    contrastive_framings: tuple[ContrastiveFraming, ...] = ()
    # The paper's few-shot transcripts exactly as released (empty for our own files).
    raw_critique_exemplars: tuple[str, ...] = ()
    description: str = ""
    source: str = ""

    def subset(self, k: int, seed: int) -> "Constitution":
        """Keeps k critique/revision pairs and k harmlessness feedback principles.

        For the number-of-principles ablation (paper figure 6). With the same
        seed, the subset of size k is contained in the subset of size k + 1, so
        runs with growing k differ only by the added principles.
        """
        return dataclasses.replace(
            self,
            name=f"{self.name}-k{k}-seed{seed}",
            critique_revision=_nested_subset(self.critique_revision, k, seed, "critique_revision"),
            feedback=_nested_subset(self.feedback, k, seed, "feedback"),
        )


T = TypeVar("T")


def _rng(*key: Any) -> np.random.Generator:
    # Hash the key so the stream depends only on its value, never on call order.
    digest = hashlib.sha256("\x1f".join(str(k) for k in key).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _nested_subset(items: Sequence[T], k: int, seed: int, what: str) -> tuple[T, ...]:
    if not 1 <= k <= len(items):
        raise ValueError(f"subset size k={k} must be between 1 and {len(items)} ({what})")
    order = _rng("subset", seed, what).permutation(len(items))
    keep = sorted(order[:k])  # keep the file's order among the chosen ones
    return tuple(items[i] for i in keep)


def sample_principles(principles: Constitution | Sequence[T], n: int, *, seed: int,
                      example_id: str | int, round: int = 0,
                      kind: str = "critique_revision") -> list[T]:
    """Draws n distinct principles for one example.

    The draw depends only on (seed, example_id, round, kind), so an example
    gets the same principles whatever batch or shard it lands in. Given a
    Constitution, `kind` picks the list: "critique_revision", "feedback" or
    "helpfulness_feedback".
    """
    if isinstance(principles, Constitution):
        if kind not in ("critique_revision", "feedback", "helpfulness_feedback"):
            raise ValueError(f"unknown principle kind {kind!r}")
        principles = getattr(principles, kind)
    principles = list(principles)
    if not 0 <= n <= len(principles):
        raise ValueError(f"cannot draw {n} distinct principles from {len(principles)}")
    picks = _rng("sample", seed, kind, example_id, round).choice(
        len(principles), size=n, replace=False)
    return [principles[i] for i in picks]


# ------------------------------------------------------------ our JSON format

class _Reader:
    """Small helpers so every error names the file and the key path."""

    def __init__(self, path: str):
        self.path = path

    def error(self, key: str, msg: str) -> ConstitutionError:
        return ConstitutionError(f"{self.path}: {key} {msg}")

    def field(self, obj: Any, key: str, name: str, kind: type = str):
        if not isinstance(obj, dict):
            raise self.error(key, f"must be an object, got {type(obj).__name__}")
        if name not in obj:
            raise self.error(key, f"is missing {name!r}")
        value = obj[name]
        if not isinstance(value, kind):
            raise self.error(f"{key}.{name}", f"must be a {kind.__name__}, got {type(value).__name__}")
        if kind is str and not value.strip():
            raise self.error(f"{key}.{name}", "is empty")
        return value

    def options(self, obj: Any, key: str, name: str) -> tuple[str, ...]:
        """A non-empty list of answer texts (the "corrects" / "incorrects" of an exemplar)."""
        options = self.field(obj, key, name, list)
        if not options or not all(isinstance(o, str) and o.strip() for o in options):
            raise self.error(f"{key}.{name}", "must be a non-empty list of non-empty strings")
        return tuple(options)

    def items(self, obj: dict, name: str, required: bool = True) -> list:
        if name not in obj:
            if required:
                raise self.error("top level", f"is missing {name!r}")
            return []
        value = obj[name]
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, got {type(value).__name__}")
        return value

    def unique_ids(self, things: Sequence[Any], name: str) -> None:
        seen = set()
        for i, thing in enumerate(things):
            if thing.id in seen:
                raise self.error(f"{name}[{i}]", f"repeats id {thing.id!r}")
            seen.add(thing.id)


def _read_json(path: str, reader: _Reader) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConstitutionError(f"{path}: invalid JSON ({json_error_text(e, whole_file=True)})") from None


def _principles(reader: _Reader, data: dict, name: str, required: bool) -> tuple[FeedbackPrinciple, ...]:
    out = []
    for i, item in enumerate(reader.items(data, name, required)):
        key = f"{name}[{i}]"
        text = reader.field(item, key, "text")
        if not text.rstrip().endswith("Options:"):
            raise reader.error(f"{key}.text", "must end with 'Options:' so the answer options can follow")
        out.append(FeedbackPrinciple(reader.field(item, key, "id"), text))
    reader.unique_ids(out, name)
    return tuple(out)


def _framings(reader: _Reader, data: dict) -> tuple[ContrastiveFraming, ...]:
    out = []
    for i, item in enumerate(reader.items(data, "contrastive_framings", required=False)):
        key = f"contrastive_framings[{i}]"
        kind = reader.field(item, key, "kind")
        if kind not in ("harmless", "helpful"):
            raise reader.error(f"{key}.kind", f"must be 'harmless' or 'helpful', got {kind!r}")
        starts = {name: reader.options(item, key, name) if name in item else ()
                  for name in ("better_starts", "worse_starts")}
        out.append(ContrastiveFraming(reader.field(item, key, "id"), kind,
                                      reader.field(item, key, "better"), reader.field(item, key, "worse"),
                                      **starts))
    reader.unique_ids(out, "contrastive_framings")
    return tuple(out)


def _turns(reader: _Reader, item: Any, key: str) -> tuple[Turn, ...]:
    raw = reader.field(item, key, "conversation", list)
    turns = []
    for j, t in enumerate(raw):
        tkey = f"{key}.conversation[{j}]"
        try:
            turns.append(Turn(reader.field(t, tkey, "role"), reader.field(t, tkey, "content")))
        except ConversationFormatError as e:
            raise reader.error(tkey, str(e)) from None
    if not turns:
        raise reader.error(f"{key}.conversation", "is empty")
    return tuple(turns)


def _critique_exemplar(reader: _Reader, item: Any, key: str) -> CritiqueTranscript:
    turns = _turns(reader, item, key)
    rounds = []
    for j, r in enumerate(reader.field(item, key, "rounds", list)):
        rkey = f"{key}.rounds[{j}]"
        rounds.append(CritiqueRound(
            critique_request=reader.field(r, rkey, "critique_request"),
            critique=reader.field(r, rkey, "critique"),
            revision_request=reader.field(r, rkey, "revision_request"),
            revision=reader.field(r, rkey, "revision")))
    try:
        return CritiqueTranscript(turns, tuple(rounds))
    except ConversationFormatError as e:
        raise reader.error(key, str(e)) from None


def _feedback_exemplar(reader: _Reader, item: Any, key: str) -> FeedbackExemplar:
    turns = _turns(reader, item, key)
    if turns[-1].role != "user":
        raise reader.error(f"{key}.conversation", "must end with a user turn")
    return FeedbackExemplar(reader.field(item, key, "id"), render_hh(turns, add_generation_prompt=True),
                            reader.options(item, key, "corrects"), reader.options(item, key, "incorrects"))


def load_constitution(path: str | os.PathLike) -> Constitution:
    """Reads a constitution in the project's JSON format (constitutions/README.md)."""
    path = os.fspath(path)
    reader = _Reader(path)
    data = _read_json(path, reader)
    if not isinstance(data, dict):
        raise reader.error("top level", "must be an object")
    pairs = []
    for i, item in enumerate(reader.items(data, "critique_revision")):
        key = f"critique_revision[{i}]"
        pairs.append(CritiqueRevisionPair(reader.field(item, key, "id"),
                                          reader.field(item, key, "critique_request"),
                                          reader.field(item, key, "revision_request")))
    if not pairs:
        raise reader.error("critique_revision", "is empty")
    reader.unique_ids(pairs, "critique_revision")
    feedback = _principles(reader, data, "feedback", required=True)
    if not feedback:
        raise reader.error("feedback", "is empty")
    crit_ex = tuple(_critique_exemplar(reader, item, f"critique_exemplars[{i}]")
                    for i, item in enumerate(reader.items(data, "critique_exemplars", False)))
    fb_ex = tuple(_feedback_exemplar(reader, item, f"feedback_exemplars[{i}]")
                  for i, item in enumerate(reader.items(data, "feedback_exemplars", False)))
    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Constitution(
        name=name,
        critique_revision=tuple(pairs),
        feedback=feedback,
        helpfulness_feedback=_principles(reader, data, "helpfulness_feedback", required=False),
        critique_exemplars=crit_ex,
        feedback_exemplars=fb_ex,
        contrastive_framings=_framings(reader, data),
        description=data.get("description", ""),
        source=path,
    )


def default_constitution_path() -> str:
    """Where the shipped default constitution lives (package data)."""
    return str(importlib.resources.files("cai_jax.data") / "constitutions" / "default.json")


def load_default_constitution() -> Constitution:
    """The project's own constitution, written in its own words."""
    return load_constitution(default_constitution_path())


def constitution_from_config(section, seed: int = 0) -> Constitution:
    """config.constitution -> Constitution: "default", "paper:DIR" or a JSON path,
    cut to a seeded subset of num_principles when that is set."""
    path = section.path
    if path == "default":
        constitution = load_default_constitution()
    elif path.startswith("paper:"):
        constitution = load_paper_prompts(path[len("paper:"):])
    else:
        constitution = load_constitution(path)
    k = section.get("num_principles")
    if k:
        constitution = constitution.subset(k, seed=seed)
    return constitution


# ---------------------------------------------------- the paper's prompt files

_CRITIQUE_WRAP = re.compile(r"\A\n\nCritiqueRequest: (.*)\n\nCritique:\Z", re.S)
_REVISION_WRAP = re.compile(r"\A\n\nRevisionRequest: (.*)\n\nRevision:\Z", re.S)


def _paper_pairs(path: str, data: Any) -> tuple[CritiqueRevisionPair, ...]:
    reader = _Reader(path)
    if not isinstance(data, dict):
        raise reader.error("top level", "must be an object of named request pairs")
    pairs = []
    for name, item in data.items():
        key = f"[{name!r}]"
        prompt = reader.field(item, key, "prompt", list)
        # The paper stores the critique request in a one-element list.
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise reader.error(f"{key}.prompt", "must be a list holding one string")
        critique = _CRITIQUE_WRAP.match(prompt[0])
        if not critique:
            raise reader.error(f"{key}.prompt", "is not of the form '\\n\\nCritiqueRequest: ...\\n\\nCritique:'")
        revision = _REVISION_WRAP.match(reader.field(item, key, "edit_request"))
        if not revision:
            raise reader.error(f"{key}.edit_request",
                               "is not of the form '\\n\\nRevisionRequest: ...\\n\\nRevision:'")
        pairs.append(CritiqueRevisionPair(name, critique.group(1), revision.group(1)))
    return tuple(pairs)


def _paper_list(path: str, data: Any, kind: type) -> list:
    reader = _Reader(path)
    if not isinstance(data, list):
        raise reader.error("top level", "must be a list")
    for i, item in enumerate(data):
        if not isinstance(item, kind):
            raise reader.error(f"[{i}]", f"must be a {kind.__name__}")
    return data


def load_paper_prompts(directory: str | os.PathLike, name: str = "paper") -> Constitution:
    """Reads the paper's supplementary prompt files into a Constitution.

    Texts are kept exactly: the request pairs are stored without their
    "\\n\\nCritiqueRequest: " / "\\n\\nCritique:" wrappers, which the prompt
    builders put back, and the feedback principles keep their leading newline.
    The few-shot transcripts are parsed into turns (and kept raw in
    `raw_critique_exemplars`); RLMadisonPrecogFewShotPrompts.json is optional.
    """
    directory = os.fspath(directory)

    def load(filename: str, required: bool = True):
        path = os.path.join(directory, filename)
        if not os.path.exists(path):
            if required:
                raise ConstitutionError(f"{path}: file not found")
            return path, None
        return path, _read_json(path, _Reader(path))

    path, data = load("CritiqueRevisionInstructions.json")
    pairs = _paper_pairs(path, data)

    path, data = load("RLMadisonInstructions.json")
    feedback = tuple(FeedbackPrinciple(f"madison{i}", text)
                     for i, text in enumerate(_paper_list(path, data, str)))

    path, data = load("CritiqueRevisionFewShotPrompts.json")
    raw_transcripts = tuple(_paper_list(path, data, str))
    transcripts = []
    for i, text in enumerate(raw_transcripts):
        try:
            transcripts.append(parse_critique_transcript(text))
        except ConversationFormatError as e:
            raise ConstitutionError(f"{path}: [{i}] {e}") from None

    path, data = load("RLMadisonFewShotPrompts.json")
    reader = _Reader(path)
    fb_ex = []
    for i, item in enumerate(_paper_list(path, data, dict)):
        key = f"[{i}]"
        fb_ex.append(FeedbackExemplar(
            f"madison_fewshot{i}", reader.field(item, key, "prompt"),
            reader.options(item, key, "corrects"), reader.options(item, key, "incorrects")))

    path, data = load("RLMadisonPrecogFewShotPrompts.json", required=False)
    cot = []
    if data is not None:
        reader = _Reader(path)
        for i, item in enumerate(_paper_list(path, data, dict)):
            template = reader.field(item, f"[{i}]", "prompt")
            if "{}" not in template:
                raise reader.error(f"[{i}].prompt", "has no '{}' slot for the principle")
            cot.append(ChainOfThoughtExemplar(f"madison_precog{i}", template))

    return Constitution(
        name=name,
        critique_revision=pairs,
        feedback=feedback,
        critique_exemplars=tuple(transcripts),
        feedback_exemplars=tuple(fb_ex),
        cot_feedback_exemplars=tuple(cot),
        raw_critique_exemplars=raw_transcripts,
        description="Prompts released with Bai et al. 2022, Constitutional AI.",
        source=directory,
    )
