"""Conversations, and how every stage shows them to a model.

A conversation is a tuple of `Turn`s. It can be rendered in two styles
(`config.data.render`, checked by `check_style`):

* "hh": the form used by the paper and the HH-RLHF data
  ("\\n\\nHuman: ...\\n\\nAssistant: ..."), see `render_hh` / `parse_hh`;
* "chat": a tokenizer's chat template, see `render_chat`.

The prompt a model answers is `build_initial_prompt`; where a sampled answer
ends is `answer_stop_strings`; the token ids of an answer, ended by its
end-of-answer token, are `encode_answer`. SFT, the preference model (training
and scoring), pairs, feedback, PPO and evaluation all use these, so an answer
is laid out the same way wherever it is trained on or scored.

The SL-CAI critique/revision prompts are built here for both forms. In the HH
form a critique round extends the transcript with

    \\n\\nCritiqueRequest: {request}\\n\\nCritique: {critique}
    \\n\\nRevisionRequest: {request}\\n\\nRevision: {revision}

exactly as in the paper's released few-shot transcripts. In the chat form each
request is a user turn and each critique or revision an assistant turn.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping, Sequence

from cai_jax.weights.tokenizer import encode_text, stop_token_ids

ROLES = ("system", "user", "assistant")
# How a conversation is shown to a model (see the module docstring).
STYLES = ("hh", "chat")

# Speaker labels of the HH text form.
HH_LABELS = {"user": "Human", "assistant": "Assistant"}
CRITIQUE_REQUEST_LABEL = "CritiqueRequest"
CRITIQUE_LABEL = "Critique"
REVISION_REQUEST_LABEL = "RevisionRequest"
REVISION_LABEL = "Revision"


class ConversationFormatError(ValueError):
    """Raised for text or turns that do not form a valid conversation."""


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConversationFormatError(
                f"unknown role {self.role!r}; expected one of {ROLES}")
        if not isinstance(self.content, str):
            raise ConversationFormatError(
                f"turn content must be a string, got {type(self.content).__name__}")


Conversation = tuple[Turn, ...]


def as_conversation(items: Iterable[Turn | Mapping[str, Any] | Sequence[str]]) -> Conversation:
    """Builds a Conversation from Turns, {"role", "content"} dicts or (role, content) pairs."""
    turns = []
    for item in items:
        if isinstance(item, Turn):
            turns.append(item)
        elif isinstance(item, Mapping):
            turns.append(Turn(item["role"], item["content"]))
        else:
            role, content = item
            turns.append(Turn(role, content))
    return tuple(turns)


def user(content: str) -> Turn:
    return Turn("user", content)


def assistant(content: str) -> Turn:
    return Turn("assistant", content)


def _check_system_first(conv: Conversation) -> None:
    for i, turn in enumerate(conv):
        if turn.role == "system" and i != 0:
            raise ConversationFormatError(
                f"a system turn may only be the first turn (found at turn {i})")


# ---------------------------------------------------------------- HH form

def _hh_segment(label: str, content: str) -> str:
    # No trailing space after an empty turn's label, so "\n\nAssistant:" is
    # the bare generation prompt.
    return f"\n\n{label}: {content}" if content else f"\n\n{label}:"


def render_hh(conv: Sequence[Turn], add_generation_prompt: bool = True) -> str:
    """Renders `conv` as "\\n\\nHuman: ...\\n\\nAssistant: ..." text.

    A leading system turn becomes plain text before the first "Human:" label
    (the HH form has no system speaker). With `add_generation_prompt` the text
    ends with "\\n\\nAssistant:" for the model to continue.
    """
    conv = tuple(conv)
    _check_system_first(conv)
    parts = []
    for turn in conv:
        if turn.role == "system":
            parts.append(turn.content)
        else:
            parts.append(_hh_segment(HH_LABELS[turn.role], turn.content))
    if add_generation_prompt:
        parts.append("\n\nAssistant:")
    return "".join(parts)


# A label starts the text (after optional whitespace) or follows a blank line.
_HH_SPLIT = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")


def parse_hh(text: str, *, allow_preamble: bool = False) -> Conversation:
    """Parses HH text back into turns.

    Turn contents are stripped of surrounding whitespace. Empty turns are kept
    (so "...\\n\\nAssistant:" ends with an empty assistant turn). Text before the
    first label is an error unless `allow_preamble`, in which case it becomes a
    system turn (the inverse of `render_hh`).
    """
    if not isinstance(text, str):
        raise ConversationFormatError(f"expected a string, got {type(text).__name__}")
    pieces = _HH_SPLIT.split(text)
    # pieces = [preamble, label, content, label, content, ...]
    preamble, rest = pieces[0], pieces[1:]
    if not rest:
        snippet = text[:60] + ("..." if len(text) > 60 else "")
        raise ConversationFormatError(
            f"no 'Human:' or 'Assistant:' turn found in {snippet!r}")
    turns = []
    if preamble.strip():
        if not allow_preamble:
            raise ConversationFormatError(
                f"unexpected text before the first 'Human:' turn: {preamble[:60]!r}")
        turns.append(Turn("system", preamble.strip()))
    role_of = {label: role for role, label in HH_LABELS.items()}
    for label, content in zip(rest[0::2], rest[1::2]):
        turns.append(Turn(role_of[label], content.strip()))
    return tuple(turns)


# -------------------------------------------------------------- chat form

def to_messages(conv: Sequence[Turn]) -> list[dict[str, str]]:
    """The list-of-dicts form that `apply_chat_template` expects."""
    return [{"role": t.role, "content": t.content} for t in conv]


def render_chat(conv: Sequence[Turn], tokenizer, add_generation_prompt: bool = True) -> str:
    """Renders `conv` with the tokenizer's chat template (as text, not ids)."""
    conv = tuple(conv)
    _check_system_first(conv)
    return tokenizer.apply_chat_template(
        to_messages(conv), tokenize=False, add_generation_prompt=add_generation_prompt)


# ------------------------------------------------- critique / revision

@dataclasses.dataclass(frozen=True)
class CritiqueRound:
    """One finished critique/revision round.

    `critique_request` and `critique` are None for a direct revision (the
    ablation in which the model revises without writing a critique first).
    """
    revision_request: str
    revision: str
    critique_request: str | None = None
    critique: str | None = None

    def __post_init__(self):
        if (self.critique_request is None) != (self.critique is None):
            raise ConversationFormatError(
                "a round needs both critique_request and critique, or neither")

    @property
    def has_critique(self) -> bool:
        return self.critique_request is not None


@dataclasses.dataclass(frozen=True)
class CritiqueTranscript:
    """A conversation ending in an assistant answer, plus finished rounds.

    Used both for few-shot exemplars and for the transcript being revised.
    """
    conversation: Conversation
    rounds: tuple[CritiqueRound, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "conversation", tuple(self.conversation))
        object.__setattr__(self, "rounds", tuple(self.rounds))
        if not self.conversation or self.conversation[-1].role != "assistant":
            raise ConversationFormatError(
                "a critique transcript must end with the assistant answer to critique")
        _check_system_first(self.conversation)

    @property
    def latest_answer(self) -> str:
        """The answer the next round critiques: the last revision, if any."""
        return self.rounds[-1].revision if self.rounds else self.conversation[-1].content


def _as_transcript(x: CritiqueTranscript | Sequence[Turn]) -> CritiqueTranscript:
    return x if isinstance(x, CritiqueTranscript) else CritiqueTranscript(tuple(x))


def _round_hh(r: CritiqueRound, include_critique: bool) -> str:
    parts = []
    if include_critique and r.has_critique:
        parts.append(_hh_segment(CRITIQUE_REQUEST_LABEL, r.critique_request))
        parts.append(_hh_segment(CRITIQUE_LABEL, r.critique))
    parts.append(_hh_segment(REVISION_REQUEST_LABEL, r.revision_request))
    parts.append(_hh_segment(REVISION_LABEL, r.revision))
    return "".join(parts)


def _round_turns(r: CritiqueRound, include_critique: bool) -> list[Turn]:
    turns = []
    if include_critique and r.has_critique:
        turns += [user(r.critique_request), assistant(r.critique)]
    turns += [user(r.revision_request), assistant(r.revision)]
    return turns


def render_transcript_hh(transcript: CritiqueTranscript, include_critique: bool = True) -> str:
    """HH text of a transcript and its rounds (no generation prompt)."""
    text = render_hh(transcript.conversation, add_generation_prompt=False)
    return text + "".join(_round_hh(r, include_critique) for r in transcript.rounds)


def transcript_turns(transcript: CritiqueTranscript, include_critique: bool = True) -> Conversation:
    """Chat turns of a transcript: requests as user turns, replies as assistant turns."""
    turns = list(transcript.conversation)
    for r in transcript.rounds:
        turns += _round_turns(r, include_critique)
    return tuple(turns)


_TRANSCRIPT_SPLIT = re.compile(
    r"(?:\A\s*|\n\n)(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")


def parse_critique_transcript(text: str) -> CritiqueTranscript:
    """Parses an HH critique/revision transcript such as the paper's few-shot ones.

    A trailing empty "Human:" (the stop sequence left at the end of the
    paper's transcripts) is dropped.
    """
    pieces = _TRANSCRIPT_SPLIT.split(text)
    if pieces[0].strip() or len(pieces) < 3:
        raise ConversationFormatError(f"not a critique transcript: {text[:60]!r}")
    segments = [(label, content.strip()) for label, content in zip(pieces[1::2], pieces[2::2])]
    if segments and segments[-1] == ("Human", ""):
        segments.pop()
    role_of = {label: role for role, label in HH_LABELS.items()}
    conv = []
    while segments and segments[0][0] in role_of:
        label, content = segments.pop(0)
        conv.append(Turn(role_of[label], content))
    rounds = []
    while segments:
        labels = [label for label, _ in segments[:4]]
        if labels == ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]:
            (_, cr), (_, c), (_, rr), (_, r) = segments[:4]
            rounds.append(CritiqueRound(critique_request=cr, critique=c, revision_request=rr, revision=r))
            del segments[:4]
        elif labels[:2] == ["RevisionRequest", "Revision"]:
            (_, rr), (_, r) = segments[:2]
            rounds.append(CritiqueRound(revision_request=rr, revision=r))
            del segments[:2]
        else:
            raise ConversationFormatError(
                f"unexpected sequence of labels {labels} in critique transcript")
    return CritiqueTranscript(tuple(conv), tuple(rounds))


# ------------------------------------- what a model reads and writes

def check_style(style: str, tokenizer) -> None:
    """Raises unless `style` is one of STYLES, with a tokenizer for "chat"."""
    if style not in STYLES:
        raise ValueError(f"render style must be one of {STYLES}, got {style!r}")
    if style == "chat" and tokenizer is None:
        raise ValueError("render style 'chat' needs a tokenizer")


def build_initial_prompt(conv: Sequence[Turn], *, style: str = "hh", tokenizer=None) -> str:
    """The prompt a model answers: a conversation that ends with the user,
    rendered in `style` with the generation prompt. Every stage that samples or
    scores an answer to a conversation renders its prompt here."""
    check_style(style, tokenizer)
    conv = tuple(conv)
    if not conv or conv[-1].role != "user":
        raise ConversationFormatError("the conversation must end with a user turn")
    if style == "hh":
        return render_hh(conv, add_generation_prompt=True)
    return render_chat(conv, tokenizer, add_generation_prompt=True)


# HH text has no end-of-turn token: a sampled answer ends where the next
# speaker label starts (chat models stop at their end-of-turn token instead).
# Either label ends it: a model continuing an HH transcript writes the next
# "Human:" turn, but it also starts a second "Assistant:" turn, and what follows
# is no longer this answer. Every stage cuts at both, so the answers the
# preference model is trained on (pairs) are cut as the ones it scores (PPO,
# evaluation) are.
HH_HUMAN_STOP = "\n\nHuman:"
HH_STOP_STRINGS = (HH_HUMAN_STOP, "\n\nAssistant:")
# In a critique/revision transcript a sampled section also ends at the next section label.
TRANSCRIPT_STOP_STRINGS = HH_STOP_STRINGS + tuple(
    f"\n\n{label}:" for label in (CRITIQUE_REQUEST_LABEL, CRITIQUE_LABEL, REVISION_REQUEST_LABEL,
                                  REVISION_LABEL))


def answer_stop_strings(style: str) -> tuple[str, ...]:
    """Where a sampled answer ends in the `style` rendering ("hh" or "chat")."""
    return HH_STOP_STRINGS if style == "hh" else ()


@functools.lru_cache(maxsize=8)
def end_of_answer_ids(tokenizer, style: str) -> tuple[int, ...]:
    """The token that ends a finished answer.

    Chat: the template's end-of-turn token ("<|im_end|>" for SmolLM2 and
    Qwen2.5), where a chat model stops by itself; the sampler keeps it as the
    answer's last token. HH text has no end-of-turn token, so EOS, which SFT
    teaches the model to end an answer with (without it a model only stops at
    `answer_stop_strings`).
    """
    check_style(style, tokenizer)
    if style == "hh":
        if tokenizer.eos_token_id is None:
            raise ValueError("render style 'hh' needs a tokenizer with an EOS token to end answers")
        return (int(tokenizer.eos_token_id),)
    prompt = render_chat((user("x"),), tokenizer, add_generation_prompt=True)
    full = render_chat((user("x"), assistant("y")), tokenizer, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template does not render the generation prompt "
                         "as a prefix of the answered conversation; set data.render='hh'")
    # The first stop token after the answer: what the template puts after it
    # (a newline) belongs to no one.
    stops = set(stop_token_ids(tokenizer))
    return tuple([t for t in encode_text(tokenizer, full[len(prompt):]) if t in stops][:1])


def encode_answer(tokenizer, conversation: Sequence[Turn], answer: str, style: str, *,
                  end: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the prompt that asks for `answer` and of the answer, laid
    out as the sampler produces them: prompt and answer tokenized apart (in HH
    text the answer follows "Assistant:" after a space) and, with `end`, the
    answer closed by its `end_of_answer_ids`. SFT trains on these ids and the
    preference model reads them (`inference.preference_scorer.preference_row`)."""
    prompt_ids = encode_text(tokenizer, build_initial_prompt(conversation, style=style, tokenizer=tokenizer))
    answer_ids = encode_text(tokenizer, " " + answer if style == "hh" else answer)
    if end:
        answer_ids += end_of_answer_ids(tokenizer, style)
    return prompt_ids, answer_ids


# ------------------------------------------- critique / revision prompts

def _hh_prompt(transcript, exemplars, include_critique, pending: str) -> str:
    few_shot = "".join(render_transcript_hh(e, include_critique) for e in exemplars)
    return few_shot + render_transcript_hh(transcript, include_critique) + pending


def _chat_prompt(transcript, exemplars, include_critique, pending: list[Turn], tokenizer) -> str:
    body = list(transcript_turns(transcript, include_critique))
    # The conversation's own system turn must stay first, ahead of the exemplars.
    system = [body.pop(0)] if body and body[0].role == "system" else []
    shots = []
    for e in exemplars:
        turns = transcript_turns(e, include_critique)
        if any(t.role == "system" for t in turns):
            raise ConversationFormatError("few-shot exemplars may not contain system turns")
        shots += turns
    return render_chat(system + shots + body + pending, tokenizer, add_generation_prompt=True)


def build_critique_prompt(transcript: CritiqueTranscript | Sequence[Turn], critique_request: str, *,
                          exemplars: Sequence[CritiqueTranscript] = (), style: str = "hh",
                          tokenizer=None) -> str:
    """Prompt asking for a critique of the transcript's latest answer."""
    check_style(style, tokenizer)
    transcript = _as_transcript(transcript)
    if style == "hh":
        pending = f"\n\n{CRITIQUE_REQUEST_LABEL}: {critique_request}\n\n{CRITIQUE_LABEL}:"
        return _hh_prompt(transcript, exemplars, True, pending)
    return _chat_prompt(transcript, exemplars, True, [user(critique_request)], tokenizer)


def build_revision_prompt(transcript: CritiqueTranscript | Sequence[Turn], critique_request: str,
                          critique: str, revision_request: str, *,
                          exemplars: Sequence[CritiqueTranscript] = (), style: str = "hh",
                          tokenizer=None) -> str:
    """Prompt asking for a revision, after the critique the model just wrote."""
    check_style(style, tokenizer)
    transcript = _as_transcript(transcript)
    if style == "hh":
        pending = (_hh_segment(CRITIQUE_REQUEST_LABEL, critique_request)
                   + _hh_segment(CRITIQUE_LABEL, critique)
                   + f"\n\n{REVISION_REQUEST_LABEL}: {revision_request}\n\n{REVISION_LABEL}:")
        return _hh_prompt(transcript, exemplars, True, pending)
    pending = [user(critique_request), assistant(critique), user(revision_request)]
    return _chat_prompt(transcript, exemplars, True, pending, tokenizer)


def build_direct_revision_prompt(transcript: CritiqueTranscript | Sequence[Turn],
                                 revision_request: str, *,
                                 exemplars: Sequence[CritiqueTranscript] = (), style: str = "hh",
                                 tokenizer=None) -> str:
    """Prompt for the no-critique ablation: revise straight away.

    Critique steps are left out of the exemplars and earlier rounds too, so the
    few-shot examples show the same shape the model is asked to continue.
    """
    check_style(style, tokenizer)
    transcript = _as_transcript(transcript)
    if style == "hh":
        pending = f"\n\n{REVISION_REQUEST_LABEL}: {revision_request}\n\n{REVISION_LABEL}:"
        return _hh_prompt(transcript, exemplars, False, pending)
    return _chat_prompt(transcript, exemplars, False, [user(revision_request)], tokenizer)
