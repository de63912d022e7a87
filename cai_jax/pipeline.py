"""The CAI recipe as a chain of resumable stages over one work directory.

Each stage is declared once below (`Stage`): the function that runs it, the
config sections it depends on, the artifacts it reads (inputs), the artifacts
it makes (outputs) and its scratch (partial files, training checkpoints it
resumes). Paths are relative to the work directory.

When a stage finishes, its manifest `<workdir>/stages/<name>.json` records its
fingerprint (its config sections, the content of its inputs, the fingerprints
of the earlier stages) and the fingerprints of its outputs (file contents; for
a model directory its saved.json, fresh per save). A later run skips the stage
only when the fingerprint matches and every output is still there, unchanged;
otherwise it reruns it and prints one line saying why.

Before a stage runs, the pipeline discards its scratch if the scratch was
started under another fingerprint (`stages/<name>.started.json`): after a kill
the stage resumes its own partial work, after a config or input change it
starts over.

Stages are referenced by module path so that this file does not import every
stage's dependencies up front.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import time
from typing import Any, Callable, Optional

import ml_collections

from cai_jax import artifacts


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage as the pipeline sees it (paths relative to the work directory)."""

    name: str
    run: str  # "module:function", StageContext -> summary dict
    config: tuple[str, ...]  # config sections its result depends on
    inputs: tuple[str, ...] = ()  # files or model directories it reads
    outputs: tuple[str, ...] = ()  # what it makes; a missing or changed one makes it rerun
    scratch: tuple[str, ...] = ()  # partial work it resumes; discarded when its fingerprint changed


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sl_generate", "cai_jax.sl_cai.generate:run_stage",
          ("seed", "model", "sampling", "constitution", "data", "sl_generate"),
          outputs=("sl_data.jsonl", "helpful_data.jsonl"),
          scratch=("sl_data.jsonl.partial", "helpful_data.jsonl.partial")),
    Stage("sl_train", "cai_jax.sl_cai.sft:run_stage", ("seed", "model", "data", "sl_train"),
          inputs=("sl_data.jsonl", "helpful_data.jsonl"), outputs=("models/sl_cai",), scratch=("sl_train",)),
    Stage("pairs", "cai_jax.rl_cai.pairs:run_stage",
          ("seed", "model", "sampling", "constitution", "data", "pairs"),
          inputs=("models/sl_cai",), outputs=("pairs.jsonl",), scratch=("pairs.jsonl.partial",)),
    Stage("feedback", "cai_jax.rl_cai.feedback:run_stage",
          ("seed", "model", "data", "constitution", "feedback"),
          inputs=("pairs.jsonl",), outputs=("labels.jsonl",), scratch=("labels.jsonl.partial",)),
    Stage("pm_train", "cai_jax.rl_cai.preference:run_stage", ("seed", "model", "data", "pm_train"),
          inputs=("labels.jsonl",), outputs=("models/pm",), scratch=("pm_train",)),
    Stage("ppo", "cai_jax.rl_cai.ppo:run_stage", ("seed", "data", "ppo"),
          inputs=("models/sl_cai", "models/pm"), outputs=("models/rl_cai/checkpoints.json",),
          scratch=("ppo", "models/rl_cai")),
    Stage("eval", "cai_jax.eval.evaluate:run_stage", ("seed", "model", "data", "eval"),
          inputs=("models/sl_cai", "models/pm"), outputs=("eval/elo.json", "report.md")),
)}
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


def _sections(config: ml_collections.ConfigDict, names) -> dict:
    return {name: config[name].to_dict() if isinstance(config[name], ml_collections.ConfigDict)
            else config[name] for name in names if name in config}


def _manifest_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", f"{name}.json")


def _read_json(path: str) -> Optional[dict]:
    """A manifest or started marker; None when absent. A torn or corrupt one
    reads as {}, which matches no fingerprint: its stage reruns (and discards
    its scratch) instead of the run stopping on it."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        print(f"warning: {path} is not valid JSON ({e}); treating its stage as not complete", flush=True)
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _made(workdir: str, name: str) -> Optional[str]:
    """What a finished stage made, as one fingerprint (None when it has not run):
    its own fingerprint and its outputs', not its timing."""
    manifest = _read_json(_manifest_path(workdir, name))
    if manifest is None:
        return None
    return artifacts.fingerprint({k: manifest.get(k) for k in ("fingerprint", "outputs")})


def _constitution_content(config) -> str:
    """The constitution's text, not just its path: "default" is package data
    that changes with the code, and a JSON file can be edited in place."""
    from cai_jax.constitution import constitution_from_config

    return artifacts.fingerprint(dataclasses.asdict(constitution_from_config(config.constitution, config.seed)))


def stage_fingerprint(config, workdir: str, name: str) -> dict:
    """What a stage's result depends on: its config sections (the constitution
    by content), its inputs' content, and what every earlier stage made (a
    rerun upstream invalidates it)."""
    stage = STAGES[name]
    sections = {k: artifacts.fingerprint(v) for k, v in _sections(config, stage.config).items()}
    if "constitution" in sections:
        sections["constitution"] = artifacts.fingerprint([sections["constitution"], _constitution_content(config)])
    return {"config": sections,
            "inputs": {rel: artifacts.path_fingerprint(os.path.join(workdir, rel)) for rel in stage.inputs},
            "upstream": {s: _made(workdir, s) for s in ORDER[:ORDER.index(name)]}}


def output_fingerprints(workdir: str, name: str) -> dict[str, Optional[str]]:
    return {rel: artifacts.path_fingerprint(os.path.join(workdir, rel)) for rel in STAGES[name].outputs}


def rerun_reason(workdir: str, name: str, fingerprint: dict) -> Optional[str]:
    """Why a stage that has a manifest must run again; None when it is complete
    (same fingerprint, outputs there and unchanged)."""
    manifest = _read_json(_manifest_path(workdir, name)) or {}
    old = manifest.get("fingerprint")
    if not isinstance(old, dict) or any(not isinstance(old.get(k), dict) for k in fingerprint) \
            or not isinstance(manifest.get("outputs"), dict):
        return "its manifest is from another version of the pipeline"
    for kind, what in (("config", "config section {} changed"), ("inputs", "input {} changed"),
                       ("upstream", "upstream stage {} changed")):
        now, before = fingerprint[kind], old[kind]
        for key in list(now) + [k for k in before if k not in now]:
            if before.get(key) != now.get(key):
                return what.format(key)
    for rel, value in output_fingerprints(workdir, name).items():
        if value is None:
            return f"{rel} is missing"
        if value != manifest["outputs"].get(rel):
            return f"{rel} changed since it was made"
    return None


def discard_stale_scratch(workdir: str, name: str, fingerprint: dict) -> bool:
    """Removes the stage's scratch when it was started under another fingerprint.

    Resuming is right after a kill, wrong after the config or inputs changed:
    the old checkpoints would be restored into the new run. The fingerprint the
    scratch was started under is kept in `stages/<name>.started.json`. Returns
    whether anything was discarded.
    """
    marker = os.path.join(workdir, "stages", f"{name}.started.json")
    started = _read_json(marker)
    stale = started is not None and started != fingerprint
    if stale:
        for rel in STAGES[name].scratch:
            path = os.path.join(workdir, rel)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    if started != fingerprint:
        artifacts.write_json_atomic(marker, fingerprint)
    return stale


def _run_stage(ctx: StageContext, name: str, fingerprint: dict) -> dict:
    """Runs one stage (its scratch checked first) and writes its manifest; returns the row."""
    missing = [rel for rel, value in fingerprint["inputs"].items() if value is None]
    if missing:
        raise FileNotFoundError(f"stage {name} needs {missing} in {ctx.workdir}; run the earlier "
                                "stages first (or all stages)")
    if discard_stale_scratch(ctx.workdir, name, fingerprint):
        print(f"{name}: discarded partial work started under another config or inputs", flush=True)
    start = time.time()
    print(f"== stage {name}", flush=True)
    summary = _resolve(STAGES[name].run)(ctx) or {}
    seconds = round(time.time() - start, 1)
    outputs = output_fingerprints(ctx.workdir, name)
    absent = [rel for rel, value in outputs.items() if value is None]
    if absent:
        raise RuntimeError(f"stage {name} finished without writing {absent} in {ctx.workdir}")
    manifest = {"stage": name, "fingerprint": fingerprint, "outputs": outputs, "seconds": seconds,
                "summary": summary}
    artifacts.write_json_atomic(_manifest_path(ctx.workdir, name), manifest)
    return {"stage": name, "status": f"done in {seconds}s", **summary}


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
        fingerprint = stage_fingerprint(config, ctx.workdir, name)
        if os.path.exists(_manifest_path(ctx.workdir, name)):
            reason = "forced (--force)" if force else rerun_reason(ctx.workdir, name, fingerprint)
            if reason is None:
                summary = _read_json(_manifest_path(ctx.workdir, name))["summary"]
                rows.append({"stage": name, "status": "skipped (complete)", **summary})
                continue
            print(f"{name}: {reason}; rerunning", flush=True)
        rows.append(_run_stage(ctx, name, fingerprint))
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | status | key numbers |", "|---|---|---|"]
    for row in rows:
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("stage", "status"))
        lines.append(f"| {row['stage']} | {row['status']} | {numbers} |")
    return "\n".join(lines)


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
