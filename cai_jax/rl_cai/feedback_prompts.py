"""The multiple-choice prompts the feedback model answers (paper section 4.1).

One question looks like

    Consider the following conversation between a human and an assistant:

    Human: ...

    Assistant: ...

    Human: ...

    {principle, which ends in "Options:"}
    (A) {answer A}
    (B) {answer B}

and the model is asked to continue "The answer is:" with " (A)" or " (B)".
Few-shot exemplars (solved questions from the constitution) come first, each
ending in its answer, and use the same principle as the question, as the
paper's files do (their "{}" slot).

Two renderings, as for every other prompt (`config.data.render`):

* "hh": the paper's raw text. The plain multiple-choice prompt is not wrapped
  in "Human:/Assistant:" turns (the paper gives it to a pretrained model as
  is); the chain-of-thought prompt is a "\\n\\nHuman: ...\\n\\nAssistant:" turn,
  as the paper reformats it for a conversational model.
* "chat": each question is a user turn, each solved answer an assistant turn;
  the answer cue starts the final assistant turn.

Chain of thought: the assistant turn starts with "Let's think step-by-step:",
the model writes its reasoning, and "So the answer is:" follows it before the
options are scored. The paper's chain-of-thought exemplars end with the stop
sequence "\\n\\nHuman:" between the reasoning and "So the answer is: (X)"; that
is dropped so the exemplars have the shape the queries have.

Pointwise questions (`feedback.source="pointwise"`) show one answer at a time:
the conversation with that answer as the assistant's last reply, then the
principle (a comparative question, "Which reply is less harmful? ...") turned
into a yes/no question about this one reply, and the cue "The answer is:"
for " Yes" (the reply fails the principle) or " No". Their exemplars are the
same solved examples, one answer each: the correct answer (verdict No) for
even-numbered exemplars, the incorrect one (verdict Yes) for odd ones.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from cai_jax.constitution import ChainOfThoughtExemplar, FeedbackExemplar
from cai_jax.data.conversation import (
    HH_HUMAN_STOP,
    Conversation,
    ConversationFormatError,
    Turn,
    answer_stop_strings,
    assistant,
    check_style,
    parse_hh,
    render_chat,
    render_hh,
    user,
)

INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER_CUE = "The answer is:"
COT_CUE = "Let's think step-by-step:"
COT_ANSWER_CUE = "So the answer is:"
# The texts whose first differing token is compared; the labeller checks that
# the tokenizer splits them into a shared prefix and one differing token.
OPTIONS = (" (A)", " (B)")
# Pointwise verdicts: slot 0 says the reply does what the principle warns against.
POINTWISE_OPTIONS = (" Yes", " No")
POINTWISE_ASK = ("Judged by that question alone, is the assistant's last reply a bad one, doing what "
                 "the question warns against or falling short of what it asks for? Answer Yes or No.")


@dataclasses.dataclass(frozen=True)
class Shot:
    """A solved question: the conversation, the two answers and which is right."""
    conversation: Conversation
    answer_a: str
    answer_b: str
    correct: str  # "A" or "B"


def exemplar_shots(exemplars: Sequence[FeedbackExemplar], limit: int = -1) -> list[Shot]:
    """Solved questions from the constitution's feedback exemplars.

    Each exemplar gives its first correct and first incorrect answer; the
    correct one goes to slot A for even-numbered exemplars and to slot B for
    odd ones, so the shots do not teach "always (A)". `limit` < 0 keeps all.
    """
    chosen = list(exemplars) if limit < 0 else list(exemplars)[:limit]
    shots = []
    for i, ex in enumerate(chosen):
        good, bad = ex.corrects[0], ex.incorrects[0]
        if i % 2 == 0:
            shots.append(Shot(ex.conversation(), good, bad, "A"))
        else:
            shots.append(Shot(ex.conversation(), bad, good, "B"))
    return shots


def conversation_text(conversation: Sequence[Turn]) -> str:
    """The conversation as "Human: ...\\n\\nAssistant: ..." text inside a question."""
    conversation = tuple(conversation)
    if not conversation:
        raise ConversationFormatError("the conversation to judge is empty")
    return render_hh(conversation, add_generation_prompt=False).lstrip("\n")


def question(conversation: Sequence[Turn], principle: str, answer_a: str, answer_b: str) -> str:
    """The question text, without any answer cue."""
    principle = principle.strip()
    if not principle.endswith("Options:"):
        raise ValueError(f"feedback principle must end with 'Options:', got ...{principle[-40:]!r}")
    return (f"{INTRO}\n\n{conversation_text(conversation)}\n\n{principle}\n"
            f"(A) {answer_a.strip()}\n(B) {answer_b.strip()}")


@dataclasses.dataclass(frozen=True)
class PointShot:
    """A solved pointwise question: one answer and its verdict ("Yes": it is bad)."""
    conversation: Conversation
    answer: str
    verdict: str  # "Yes" or "No"


def pointwise_shots(exemplars: Sequence[FeedbackExemplar], limit: int = -1) -> list[PointShot]:
    """Solved pointwise questions from the constitution's feedback exemplars,
    alternating a good answer (No) and a bad one (Yes) so that the shots do not
    teach one verdict. `limit` < 0 keeps all."""
    chosen = list(exemplars) if limit < 0 else list(exemplars)[:limit]
    return [PointShot(ex.conversation(), ex.corrects[0], "No") if i % 2 == 0
            else PointShot(ex.conversation(), ex.incorrects[0], "Yes") for i, ex in enumerate(chosen)]


def principle_as_standard(principle: str) -> str:
    """The principle's question without its trailing "Options:"."""
    principle = principle.strip()
    if not principle.endswith("Options:"):
        raise ValueError(f"feedback principle must end with 'Options:', got ...{principle[-40:]!r}")
    return principle[:-len("Options:")].rstrip()


def pointwise_question(conversation: Sequence[Turn], principle: str, answer: str) -> str:
    """One answer under one principle, without any answer cue. The answer
    comes before the principle so that, without exemplars, the prompts about
    one conversation share everything up to the answer whatever the principle
    (computed once, see inference/prefix_groups.py)."""
    shown = tuple(conversation) + (assistant(answer.strip()),)
    return (f"{INTRO}\n\n{conversation_text(shown)}\n\n"
            f"Reviewers compare replies by asking: \"{principle_as_standard(principle)}\"\n{POINTWISE_ASK}")


def build_pointwise_prompt(conversation: Sequence[Turn], principle: str, answer: str, *,
                           shots: Sequence[PointShot] = (), style: str = "hh", tokenizer=None) -> str:
    """The pointwise prompt, ending in "The answer is:" (then " Yes" or " No")."""
    check_style(style, tokenizer)
    query = pointwise_question(conversation, principle, answer)
    if style == "hh":
        blocks = [f"{pointwise_question(s.conversation, principle, s.answer)}\n{ANSWER_CUE} {s.verdict}"
                  for s in shots]
        return "\n\n".join(blocks + [f"{query}\n{ANSWER_CUE}"])
    turns = []
    for s in shots:
        turns += [user(pointwise_question(s.conversation, principle, s.answer)),
                  assistant(f"{ANSWER_CUE} {s.verdict}")]
    turns.append(user(query))
    return render_chat(turns, tokenizer, add_generation_prompt=True) + ANSWER_CUE


def build_choice_prompt(conversation: Sequence[Turn], principle: str, answer_a: str, answer_b: str,
                        *, shots: Sequence[Shot] = (), style: str = "hh", tokenizer=None) -> str:
    """The plain multiple-choice prompt, ending in "The answer is:"."""
    check_style(style, tokenizer)
    query = question(conversation, principle, answer_a, answer_b)
    if style == "hh":
        blocks = [f"{question(s.conversation, principle, s.answer_a, s.answer_b)}\n"
                  f"{ANSWER_CUE} ({s.correct})" for s in shots]
        return "\n\n".join(blocks + [f"{query}\n{ANSWER_CUE}"])
    turns = []
    for s in shots:
        turns += [user(question(s.conversation, principle, s.answer_a, s.answer_b)),
                  assistant(f"{ANSWER_CUE} ({s.correct})")]
    turns.append(user(query))
    return render_chat(turns, tokenizer, add_generation_prompt=True) + ANSWER_CUE


_COT_STOP_BEFORE_ANSWER = re.compile(
    r"\s*" + re.escape(HH_HUMAN_STOP) + r"\s*\n?" + re.escape(COT_ANSWER_CUE))


def _cot_exemplar_text(exemplar: ChainOfThoughtExemplar, principle: str) -> str:
    """The paper's exemplar with the principle filled in and its stop sequence
    before "So the answer is:" replaced by a newline."""
    return _COT_STOP_BEFORE_ANSWER.sub("\n" + COT_ANSWER_CUE, exemplar.render(principle))


def _cot_exemplar_turns(exemplar: ChainOfThoughtExemplar, principle: str) -> list[Turn]:
    turns = parse_hh(_cot_exemplar_text(exemplar, principle))
    if [t.role for t in turns] != ["user", "assistant"]:
        raise ConversationFormatError(
            f"chain-of-thought exemplar {exemplar.id}: expected one Human and one Assistant turn, "
            f"got roles {[t.role for t in turns]}")
    return list(turns)


def build_cot_prompt(conversation: Sequence[Turn], principle: str, answer_a: str, answer_b: str,
                     *, exemplars: Sequence[ChainOfThoughtExemplar] = (), style: str = "hh",
                     tokenizer=None) -> str:
    """The chain-of-thought prompt, ending in "Let's think step-by-step:" for the
    model to continue with its reasoning."""
    check_style(style, tokenizer)
    query = question(conversation, principle, answer_a, answer_b)
    if style == "hh":
        few_shot = "".join(_cot_exemplar_text(e, principle) for e in exemplars)
        return f"{few_shot}{render_hh((user(query),))} {COT_CUE}"
    turns = []
    for e in exemplars:
        turns += _cot_exemplar_turns(e, principle)
    turns.append(user(query))
    return render_chat(turns, tokenizer, add_generation_prompt=True) + COT_CUE


def cot_answer_suffix(reasoning: str) -> str:
    """What follows the chain-of-thought prompt: the reasoning and the answer cue."""
    return f" {reasoning.strip()}\n{COT_ANSWER_CUE}"


def cot_answer_prompt(cot_prompt: str, reasoning: str) -> str:
    """The chain-of-thought prompt with the model's reasoning and the answer cue."""
    return cot_prompt + cot_answer_suffix(reasoning)


def cot_stop_strings(style: str) -> tuple[str, ...]:
    """Where a sampled reasoning ends: at the answer line, or where any answer
    in the `style` rendering ends (HH text: the next speaker label)."""
    return (COT_ANSWER_CUE,) + answer_stop_strings(style)
