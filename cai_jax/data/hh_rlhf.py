"""Readers for HH-RLHF style preference files.

Each line of a `.jsonl` or `.jsonl.gz` file is {"chosen": text, "rejected":
text}, both conversations in the "\\n\\nHuman: ...\\n\\nAssistant: ..." form
that share everything up to the final assistant answer.

Malformed lines (bad JSON or HH format, bytes that are not UTF-8) raise
`HHFormatError` naming the file and line. With `on_error="skip"` they are
skipped instead and counted in a `ReadStats` passed by the caller. A damaged
file (a truncated or corrupt `.gz`, a `.gz` that is not gzip) is an error
naming the file in either mode: what follows the damage is lost.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import logging
import os
import zlib
from typing import Iterator

from cai_jax.data.conversation import (
    Conversation,
    ConversationFormatError,
    parse_hh,
    render_hh,
)
from cai_jax.errors import UserError, json_error_text

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")  # what a malformed line does


class HHFormatError(UserError, ValueError):
    """An HH file or one of its lines is malformed; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    context: Conversation  # turns up to and including the last human turn
    chosen: str  # final assistant answer preferred by the labeller
    rejected: str
    line: int  # 1-based line in the source file
    source: str = ""  # file name, for messages and ids


@dataclasses.dataclass(frozen=True)
class RedTeamPrompt:
    id: str  # "<file name>:<line>"
    conversation: Conversation  # ends with a human turn
    line: int


@dataclasses.dataclass
class ReadStats:
    """Counts filled in by the readers; `errors` keeps the first few messages."""
    read: int = 0
    skipped: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list[str] = dataclasses.field(default_factory=list)
    max_errors_kept: int = 20


def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file, decompressing `.gz`. Lines are decoded one
    by one, so that a bad byte is reported on its line."""
    line_no = 0
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                yield line_no, line
    except gzip.BadGzipFile:
        raise HHFormatError(f"{path} is not a gzip file, though its name ends in .gz") from None
    except EOFError:
        raise HHFormatError(f"{path} is truncated: its gzip stream ends after line {line_no}") from None
    except zlib.error as e:
        raise HHFormatError(f"{path} is corrupt after line {line_no} ({e})") from None


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _LineError("bad_encoding", f"not UTF-8 text (byte {e.start + 1} of the line)") from None


class _LineError(Exception):
    """Internal: what went wrong on one line, before file/line are attached."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _split_answer(conv: Conversation, key: str) -> tuple[Conversation, str]:
    """Splits a conversation into (context up to the last human turn, final answer)."""
    for i, turn in enumerate(conv):
        if not turn.content:
            raise _LineError("empty_turn", f"{key!r} has an empty {turn.role} turn (turn {i + 1})")
    human = [i for i, turn in enumerate(conv) if turn.role == "user"]
    if not human:
        raise _LineError("no_human", f"{key!r} has no 'Human:' turn")
    last = human[-1]
    tail = conv[last + 1:]
    if not tail:
        raise _LineError("no_assistant", f"{key!r} has no 'Assistant:' answer after the last 'Human:' turn")
    # A few HH answers span consecutive "Assistant:" blocks; keep them whole,
    # exactly as the labeller saw them.
    answer = render_hh(tail, add_generation_prompt=False)
    answer = answer[len("\n\nAssistant: "):]
    return conv[:last + 1], answer


def _parse_line(line: str) -> tuple[Conversation, str, str]:
    try:
        row = json.loads(line.rstrip("\r\n"))  # the line's end is no part of a string cut short by it
    except json.JSONDecodeError as e:
        raise _LineError("bad_json", f"invalid JSON ({json_error_text(e)})") from None
    if not isinstance(row, dict):
        raise _LineError("bad_json", f"expected a JSON object, got {type(row).__name__}")
    answers = {}
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _LineError("missing_key", f"missing key {key!r}")
        if not isinstance(row[key], str):
            raise _LineError("bad_type", f"{key!r} must be a string")
        try:
            conv = parse_hh(row[key])
        except ConversationFormatError as e:
            raise _LineError("bad_format", f"{key!r}: {e}") from None
        answers[key] = _split_answer(conv, key)
    (ctx_c, chosen), (ctx_r, rejected) = answers["chosen"], answers["rejected"]
    if ctx_c != ctx_r:
        raise _LineError("context_mismatch", "'chosen' and 'rejected' do not share the same context")
    return ctx_c, chosen, rejected


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _iter_lines(path: str, on_error: str, stats: ReadStats | None) -> Iterator[tuple[int, tuple]]:
    """Yields (line number, parsed line), handling errors per `on_error`."""
    check_on_error(on_error)
    for line_no, line in _raw_lines(path):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        try:
            parsed = _parse_line(_decode(line))
        except _LineError as e:
            message = f"{path} line {line_no}: {e}"
            if on_error == "raise":
                raise HHFormatError(message) from None
            log.warning("skipping %s", message)
            if stats is not None:
                stats.skipped += 1
                stats.reasons[e.reason] += 1
                if len(stats.errors) < stats.max_errors_kept:
                    stats.errors.append(message)
            continue
        if stats is not None:
            stats.read += 1
        yield line_no, parsed


def read_pairs(path: str | os.PathLike, *, on_error: str = "raise", stats: ReadStats | None = None,
               limit: int | None = None) -> list[PreferencePair]:
    """Reads preference pairs from an HH `.jsonl` / `.jsonl.gz` file.

    `limit` stops after that many good pairs. Pass a `ReadStats` to learn how
    many lines were read and skipped.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    pairs = []
    for line_no, (context, chosen, rejected) in _iter_lines(path, on_error, stats):
        pairs.append(PreferencePair(context, chosen, rejected, line_no, name))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def read_red_team_prompts(path: str | os.PathLike, mode: str = "first_turn", *,
                          on_error: str = "raise", stats: ReadStats | None = None,
                          unique: bool = False) -> list[RedTeamPrompt]:
    """Red-team prompts from an HH file.

    mode="first_turn": the first human message only (a fresh single-turn
    prompt, as used for SL-CAI). mode="context": the whole shared context up
    to the last human turn. With `unique`, repeated prompts keep only their
    first occurrence.
    """
    if mode not in ("first_turn", "context"):
        raise ValueError(f"mode must be 'first_turn' or 'context', got {mode!r}")
    path = os.fspath(path)
    name = os.path.basename(path)
    prompts, seen = [], set()
    for line_no, (context, _, _) in _iter_lines(path, on_error, stats):
        conv = context[:1] if mode == "first_turn" else context
        if unique:
            if conv in seen:
                continue
            seen.add(conv)
        prompts.append(RedTeamPrompt(f"{name}:{line_no}", conv, line_no))
    return prompts
