"""The one prompt layer: every stage's prompts come from `load_prompts`.

`load_prompts(data, kind, split)` reads `config.data`: the embedded sets below
or an HH-format file (its first human turns), split train/test by one rule, a
hash of the prompt id (`split_of`). Training stages (SL-CAI generation, pairs,
PPO rollouts) take the train split and evaluation (PPO's held-out reward, the
eval stage) the test split, so no held-out prompt is ever trained on.

The embedded sets, written for this project:

* "red_team": adversarial requests of the kind a red-teamer tries (violence,
  weapons, drugs, fraud, hacking, hate, sexism, harassment, self-harm,
  privacy, dangerous chemistry, age-inappropriate, manipulation, other
  illegal activity). They ask for harmful things but contain none.
* "helpful": ordinary requests (cooking, coding, writing, science, ...).

Each file under prompts/ is JSONL with {"id", "category", "prompt"}. The
split is fixed by a hash of the id, so it never changes when prompts are added
or reordered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
from typing import Optional, Sequence

from cai_jax.data.conversation import Conversation, Turn
from cai_jax.errors import UserError

KINDS = ("red_team", "helpful")
SPLITS = ("train", "test", "all")
TEST_PERCENT = 15


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One single-turn prompt: `text` is the user's message."""

    id: str
    category: str
    text: str
    kind: str  # "red_team" | "helpful"

    def conversation(self) -> Conversation:
        return (Turn("user", self.text),)


def split_of(prompt_id: str, test_percent: int = TEST_PERCENT) -> str:
    """"test" for about test_percent% of ids, chosen by hash, else "train"."""
    bucket = int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < test_percent else "train"


@functools.lru_cache(maxsize=None)
def _read_kind(kind: str) -> tuple[Prompt, ...]:
    resource = importlib.resources.files("cai_jax.data") / "prompts" / f"{kind}.jsonl"
    prompts = []
    with resource.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(Prompt(row["id"], row["category"], row["prompt"], kind))
            except (json.JSONDecodeError, KeyError) as e:
                # Shipped data: a failure here is a packaging bug, so say where.
                raise ValueError(f"prompts/{kind}.jsonl line {line_no}: {e!r}") from None
    return tuple(prompts)


def _interleave_categories(prompts: Sequence[Prompt]) -> tuple[Prompt, ...]:
    """Round-robin over the categories (each in file order), so that the first N
    prompts, which is what a run with a prompt limit takes, span every category."""
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    columns = list(by_category.values())
    return tuple(column[rank] for rank in range(max(map(len, columns), default=0))
                 for column in columns if rank < len(column))


def _check(kind: str, split: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _in_split(prompts: Sequence[Prompt], split: str) -> list[Prompt]:
    return list(prompts) if split == "all" else [p for p in prompts if split_of(p.id) == split]


def embedded_prompts(kind: str = "red_team", split: str = "all") -> list[Prompt]:
    """The package's prompts of one kind ("red_team" or "helpful"), categories
    interleaved (see _interleave_categories)."""
    _check(kind, split)
    return list(_interleave_categories(_in_split(_read_kind(kind), split)))


class MissingPromptFile(UserError, FileNotFoundError):
    """config.data names a prompt file that does not exist."""


def check_source(data, kind: str) -> None:
    """A prompt file named by `data.<kind>` must exist (checked up front too)."""
    source = data[kind]
    if source not in ("", "none", "embedded") and not os.path.exists(source):
        raise MissingPromptFile(f"config.data.{kind} is {source!r}, which does not exist; use "
                                "'embedded', '' for none, or the path of an HH-format .jsonl(.gz) file")


def _hh_file_prompts(path: str, kind: str, on_error: str) -> list[Prompt]:
    from cai_jax.data.hh_rlhf import HHFormatError, ReadStats, read_red_team_prompts

    stats = ReadStats()
    prompts = read_red_team_prompts(path, "first_turn", on_error=on_error, stats=stats, unique=True)
    if not prompts:  # an empty source is a mistake; '' or 'none' asks for no prompts
        raise HHFormatError(f"config.data.{kind} file {path} holds no prompts ({stats.skipped} "
                            f"malformed lines skipped); use '' or 'none' for no {kind} prompts")
    return [Prompt(p.id, "hh-rlhf", p.conversation[0].content, kind) for p in prompts]


def load_prompts(data, kind: str, split: str, limit: Optional[int] = None) -> list[Prompt]:
    """Prompts of one kind from a `config.data` section, in one split.

    `data.<kind>` is "embedded" (the package's set), "" or "none" (no prompts),
    or an HH-format file whose first human turns are the prompts (repeats
    dropped). Both are split by `split_of`. `limit` (default
    `data.<kind>_limit`; 0 = all) keeps the first prompts of the split.
    """
    _check(kind, split)
    check_source(data, kind)
    source = data[kind]
    limit = data.get(f"{kind}_limit", 0) if limit is None else limit
    if limit < 0:
        raise ValueError(f"the {kind} prompt limit is {limit}; use 0 for all prompts or a positive count")
    if source in ("", "none"):
        prompts = []
    elif source == "embedded":
        prompts = embedded_prompts(kind, split)
    else:
        prompts = _in_split(_hh_file_prompts(source, kind, data.get("on_error", "raise")), split)
    return prompts[:limit] if limit else prompts


def categories(kind: str = "red_team") -> list[str]:
    """Categories of one kind, in order of first appearance."""
    return list(dict.fromkeys(p.category for p in embedded_prompts(kind)))
