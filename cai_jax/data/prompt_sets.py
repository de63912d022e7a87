"""Prompt sets shipped with the package, written for this project.

* "red_team": adversarial requests of the kind a red-teamer tries (violence,
  weapons, drugs, fraud, hacking, hate, sexism, harassment, self-harm,
  privacy, dangerous chemistry, age-inappropriate, manipulation, other
  illegal activity). They ask for harmful things but contain none.
* "helpful": ordinary requests (cooking, coding, writing, science, ...).

Each file under prompts/ is JSONL with {"id", "category", "prompt"}. The
train/test split is fixed by a hash of the id, so it never changes when
prompts are added or reordered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
from typing import Sequence

from cai_jax.data.conversation import Conversation, Turn

KINDS = ("red_team", "helpful")
SPLITS = ("train", "test", "all")
TEST_PERCENT = 15


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str
    kind: str

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


def load_prompts(kind: str = "red_team", split: str = "all") -> list[Prompt]:
    """Embedded prompts of one kind ("red_team" or "helpful"), categories
    interleaved (see _interleave_categories)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    prompts = _read_kind(kind)
    if split != "all":
        prompts = [p for p in prompts if split_of(p.id) == split]
    return list(_interleave_categories(prompts))


def categories(kind: str = "red_team") -> list[str]:
    """Categories of one kind, in order of first appearance."""
    return list(dict.fromkeys(p.category for p in load_prompts(kind)))
