"""The CAI recipe as a chain of resumable stages over one work directory.

Each stage reads its inputs from the work directory and writes its outputs
there. When a stage finishes, a manifest `<workdir>/stages/<name>.json` records
a hash of the config it ran with and of its input files; a later run skips the
stage when the manifest matches, and reruns it when its config or inputs
changed. Stages resume their own partial work (generation appends finished
records; training restores its latest checkpoint), so a killed run continues
where it stopped.

Stages are referenced by module path so that this file does not import every
stage's dependencies up front.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time
from typing import Any, Callable, Optional

import ml_collections

from cai_jax import artifacts

# name -> (module:function, config sections it depends on, input artifacts)
STAGES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "sl_generate": ("cai_jax.sl_cai.generate:run_stage", ("seed", "model", "sampling", "constitution", "data", "sl_generate"), ()),
    "sl_train": ("cai_jax.sl_cai.sft:run_stage", ("seed", "model", "data", "sl_train"), ("sl_data.jsonl", "helpful_data.jsonl")),
    "pairs": ("cai_jax.rl_cai.pairs:run_stage", ("seed", "sampling", "data", "pairs"), ("models/sl_cai/saved.json",)),
    "feedback": ("cai_jax.rl_cai.feedback:run_stage", ("seed", "model", "data", "constitution", "feedback"), ("pairs.jsonl",)),
    "pm_train": ("cai_jax.rl_cai.preference:run_stage", ("seed", "model", "data", "pm_train"), ("labels.jsonl",)),
    "ppo": ("cai_jax.rl_cai.ppo:run_stage", ("seed", "data", "ppo"), ("models/sl_cai/saved.json", "models/pm/saved.json")),
    "eval": ("cai_jax.eval.evaluate:run_stage", ("seed", "model", "data", "eval"), ("models/sl_cai/saved.json", "models/pm/saved.json")),
}
ORDER = tuple(STAGES)


@dataclasses.dataclass
class StageContext:
    """What a stage gets: the full config, the work directory, and display options."""

    config: ml_collections.ConfigDict
    workdir: str
    progress: bool = True

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)


def _resolve(ref: str) -> Callable[[StageContext], dict]:
    module, fn = ref.split(":")
    return getattr(importlib.import_module(module), fn)


def _section_hash(config: ml_collections.ConfigDict, sections) -> str:
    picked = {}
    for name in sections:
        if name not in config:
            continue
        value = config[name]
        picked[name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_fingerprint(config, workdir: str, name: str) -> dict:
    """What a stage's result depends on: its config sections, its input files,
    and the manifests of every earlier stage (a rerun upstream invalidates it)."""
    _, sections, inputs = STAGES[name]
    upstream = ORDER[:ORDER.index(name)]
    return {"config": _section_hash(config, sections),
            "inputs": {rel: artifacts.file_hash(os.path.join(workdir, rel)) for rel in inputs},
            "upstream": {s: artifacts.file_hash(_manifest_path(workdir, s)) for s in upstream}}


def _manifest_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", f"{name}.json")


def discard_stale_work(config, workdir: str, name: str, paths) -> bool:
    """Removes a stage's partial work (`.partial` files, training checkpoints;
    paths relative to workdir) when it was started under another fingerprint.

    Resuming is right after a kill, wrong after the config or inputs changed:
    the old checkpoints would be restored into the new run. The fingerprint the
    work was started under is kept in `stages/<name>.started.json`. Returns
    whether anything was removed.
    """
    import shutil

    marker = os.path.join(workdir, "stages", f"{name}.started.json")
    current = stage_fingerprint(config, workdir, name)
    stale = False
    if os.path.exists(marker):
        with open(marker) as f:
            stale = json.load(f) != current
    if stale:
        for rel in paths:
            path = os.path.join(workdir, rel)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    if stale or not os.path.exists(marker):
        artifacts.write_json_atomic(marker, current)
    return stale


def is_complete(config, workdir: str, name: str) -> bool:
    path = _manifest_path(workdir, name)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        manifest = json.load(f)
    return manifest.get("fingerprint") == stage_fingerprint(config, workdir, name)


def run_pipeline(config, workdir: str, stages: Optional[list[str]] = None, progress: bool = True,
                 force: bool = False) -> list[dict[str, Any]]:
    """Runs the named stages (default: all, in recipe order); returns one summary
    row per stage."""
    stages = list(stages or ORDER)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {list(ORDER)}")
    stages.sort(key=ORDER.index)
    os.makedirs(workdir, exist_ok=True)
    artifacts.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    ctx = StageContext(config, os.path.abspath(workdir), progress)
    rows = []
    for name in stages:
        if not force and is_complete(config, workdir, name):
            with open(_manifest_path(workdir, name)) as f:
                rows.append({"stage": name, "status": "skipped (complete)", **json.load(f)["summary"]})
            continue
        _, _, inputs = STAGES[name]
        missing = [rel for rel in inputs if not os.path.exists(os.path.join(workdir, rel))]
        if missing:
            raise FileNotFoundError(f"stage {name} needs {missing} in {workdir}; run the earlier "
                                    "stages first (or all stages)")
        start = time.time()
        print(f"== stage {name}", flush=True)
        summary = _resolve(STAGES[name][0])(ctx) or {}
        seconds = round(time.time() - start, 1)
        manifest = {"stage": name, "fingerprint": stage_fingerprint(config, workdir, name),
                    "seconds": seconds, "summary": summary}
        artifacts.write_json_atomic(_manifest_path(workdir, name), manifest)
        rows.append({"stage": name, "status": f"done in {seconds}s", **summary})
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | status | key numbers |", "|---|---|---|"]
    for row in rows:
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("stage", "status"))
        lines.append(f"| {row['stage']} | {row['status']} | {numbers} |")
    return "\n".join(lines)


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
