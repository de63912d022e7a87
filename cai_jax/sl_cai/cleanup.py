"""Clean-up of sampled answers, critiques and revisions.

A sampled continuation often runs past its own section: in the HH rendering a
model that finished its critique goes on with "RevisionRequest: ..." or a new
"Human:" turn, and a chat model sometimes repeats the label it was prompted
with ("Revision: ..."). Clean-up

1. strips scaffolding at the start: labels ("Critique:", "Revision:",
   "Assistant:", "Revised response:") and announcements ("Here's a revised
   version of the response:"),
2. cuts the text where a new section starts (a transcript label at the start
   of a line, a request label anywhere, a chat-template special token),
3. removes quotes around the whole text,
4. drops what is left when it is no use as training data: empty, stuck in a
   loop (repeated lines, sentences or phrases), an echo of the request (or,
   for a revision, of the critique) instead of an answer, a copy of the
   few-shot exemplar's own critique or revision (a 0.5B chat model copies
   the exemplar about one time in five), or (for a revision)
   commentary about the reply ("The response is ...") instead of a new reply.

A dropped revision is reported with its reason; the generation stage then
keeps the previous answer as the current one.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections import Counter
from typing import Iterable, Optional

DROP_REASONS = ("empty", "repeated_lines", "repetition", "echo_request", "echo_critique", "echo_exemplar",
                "commentary")

# Labels the model may put in front of its text, because the prompt ended with them
# or because chat models like to announce what they write.
_LEADING_LABEL = re.compile(
    r"\A\s*(?:Critique|Revision|Assistant|Revised (?:response|answer|reply)|Rewritten (?:response|answer|reply))"
    r"\s*:\s*", re.I)

# Chat models often announce a revision before giving it ("Here's a revised
# version of the response:"); the announcement is not part of the answer.
_PREAMBLE = re.compile(
    r"\A\s*(?:Sure[,!.]?\s*)?(?:Here(?:'s| is) (?:a |an |the |my )?(?:revised|rewritten|new|updated|improved)"
    r"[^\n:]{0,60}:)\s*", re.I)

# A new section: a transcript label at the start of a line, a request label
# anywhere (never legitimate text), or a chat special token.
_SECTION_START = re.compile(
    r"(?:(?:\A|\n)[ \t]*(?:Human|Assistant|User|CritiqueRequest|Critique|RevisionRequest|Revision"
    r"|Rewrite|(?:Revised|Rewritten) (?:response|answer|reply))[ \t]*:"
    r"|CritiqueRequest:|RevisionRequest:"
    r"|<\|(?:im_start|im_end|endoftext|eot_id|user|assistant|system)\|>|</s>)")


@dataclasses.dataclass(frozen=True)
class Cleaned:
    text: str
    dropped: Optional[str] = None  # one of DROP_REASONS, or None when kept


def strip_leading_labels(text: str) -> str:
    """Removes scaffolding labels and announcements at the start, repeatedly
    ("Revision: Revision: x" -> "x")."""
    while True:
        stripped = _PREAMBLE.sub("", _LEADING_LABEL.sub("", text, count=1), count=1)
        if stripped == text:
            return text.strip()
        text = stripped


def _unquote(text: str) -> str:
    # A revision given as a quotation: the quotes are not part of the answer.
    for left, right in (('"', '"'), ("\u201c", "\u201d")):
        if len(text) > 2 and text.startswith(left) and text.endswith(right) and left not in text[1:-1] \
                and right not in text[1:-1]:
            return text[1:-1].strip()
    return text


def cut_at_section_start(text: str, extra_stops: Iterable[str] = ()) -> str:
    """Text up to the first place where a new section begins (or an extra stop string)."""
    end = len(text)
    match = _SECTION_START.search(text)
    if match:
        end = match.start()
    for stop in extra_stops:
        pos = text.find(stop)
        if stop and 0 <= pos < end:
            end = pos
    return text[:end]


def clean_text(raw: str, extra_stops: Iterable[str] = ()) -> str:
    """Label stripping, cutting, then quotes around the whole text; whitespace trimmed."""
    return _unquote(cut_at_section_start(strip_leading_labels(raw), extra_stops).strip())


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def repetition_reason(text: str, *, max_line_repeats: int = 3, min_words: int = 24,
                      min_distinct_ngram_fraction: float = 0.4) -> Optional[str]:
    """"repeated_lines" or "repetition" when the text is stuck in a loop, else None.

    Lines: some non-trivial line occurs `max_line_repeats` times, or at most half
    of the lines (when there are 4+) are distinct. Phrases: a sentence of four or
    more words occurs `max_line_repeats` times, or a text of `min_words`+ words
    has few distinct word 4-grams (a loop such as "I'm sorry. I'm sorry. ...").
    """
    lines = [_normalise(line) for line in text.splitlines()]
    lines = [line for line in lines if len(line) > 3]
    if lines:
        if Counter(lines).most_common(1)[0][1] >= max_line_repeats:
            return "repeated_lines"
        if len(lines) >= 4 and len(set(lines)) <= len(lines) / 2:
            return "repeated_lines"
    sentences = [_normalise(x) for x in re.split(r"(?<=[.!?])\s+|\n+", text)]
    sentences = [x for x in sentences if len(x.split()) >= 4]
    if sentences and Counter(sentences).most_common(1)[0][1] >= max_line_repeats:
        return "repetition"
    words = _normalise(text).split()
    if len(words) >= min_words:
        grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
        if len(set(grams)) < min_distinct_ngram_fraction * len(grams):
            return "repetition"
    return None


def is_echo(text: str, source: str, *, min_similarity: float = 0.8) -> bool:
    """True when `text` is (nearly) a copy of `source`, or mostly consists of it."""
    t, s = _normalise(text), _normalise(source)
    if not t or not s:
        return False
    if s in t and len(s) >= 0.6 * len(t):
        return True
    # Opening with the source's first words: small models start a revision by
    # copying the critique, then cut off or wander.
    opening = s[:60]
    if len(opening) == 60 and t.startswith(opening):
        return True
    return difflib.SequenceMatcher(None, t, s, autojunk=False).ratio() >= min_similarity


# A revision must be the assistant's new reply; small models often write about
# the reply instead ("The response is ..."), which is a critique, not a revision.
_COMMENTARY = re.compile(
    r"\A(?:The|This|That|Your) (?:assistant'?s? )?(?:last |previous |original |revised )?"
    r"(?:response|reply|answer|assistant)\b", re.I)


def _degenerate(text: str) -> Optional[str]:
    if not re.search(r"[^\W_]", text):  # no letter or digit at all
        return "empty"
    return repetition_reason(text)


def clean_answer(raw: str, extra_stops: Iterable[str] = ()) -> Cleaned:
    """An initial (or helpful) answer: cut and checked for emptiness and loops."""
    text = clean_text(raw, extra_stops)
    return Cleaned(text, _degenerate(text))


def clean_critique(raw: str, critique_request: str, extra_stops: Iterable[str] = (),
                   exemplar_texts: Iterable[str] = ()) -> Cleaned:
    """A critique is dropped when degenerate, when it repeats its request, or
    when it copies a text of the exemplars it was shown."""
    text = clean_text(raw, extra_stops)
    reason = _degenerate(text)
    if reason is None and is_echo(text, critique_request):
        reason = "echo_request"
    if reason is None and any(is_echo(text, e) for e in exemplar_texts):
        reason = "echo_exemplar"
    return Cleaned(text, reason)


def clean_revision(raw: str, revision_request: str, critique_request: Optional[str] = None,
                   critique: Optional[str] = None, extra_stops: Iterable[str] = (),
                   exemplar_texts: Iterable[str] = ()) -> Cleaned:
    """A revision is dropped when degenerate, when it repeats either request,
    when it copies the critique instead of rewriting the answer, or when it
    copies a text of the exemplars it was shown."""
    text = clean_text(raw, extra_stops)
    reason = _degenerate(text)
    if reason is None and any(is_echo(text, r) for r in (revision_request, critique_request) if r):
        reason = "echo_request"
    if reason is None and critique and is_echo(text, critique):
        reason = "echo_critique"
    if reason is None and any(is_echo(text, e) for e in exemplar_texts):
        reason = "echo_exemplar"
    if reason is None and _COMMENTARY.match(text):
        reason = "commentary"
    return Cleaned(text, reason)
