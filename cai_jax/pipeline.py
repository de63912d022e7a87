"""The CAI recipe as a chain of resumable stages over one work directory.

Each stage is declared once below (`Stage`): the function that runs it, the
config sections it depends on, the artifacts it reads (inputs), the artifacts
it makes (outputs) and its scratch (partial files, training checkpoints it
resumes). Paths are relative to the work directory.

When a stage finishes, its manifest `<workdir>/stages/<name>.json` records its
fingerprint (its config sections with the content of any file they name, the
content of its inputs, the fingerprints of the earlier stages) and the
fingerprints of its outputs (file contents; for a directory, every file in it,
so a model's weights are checksummed; a saved model counts by its parameters'
values, which its seal records with its files' checksums, so the same weights
saved again, under orbax's random file names, keep their fingerprint: see
artifacts.content_fingerprint). A later run skips the stage only when
the fingerprint matches and every output is still there, unchanged; otherwise
it reruns it and prints one line saying why.

A stage never writes over finished work. It runs in `<workdir>/.staging/<name>/`,
a copy of the work directory made of symlinks except for the paths the stage
owns (its outputs and scratch), which start empty there. Only when it has
finished are its new paths swapped in, the old ones moved out, and its manifest
written; a swap cut short by a kill is completed by the next run (a journal,
`.staging/<name>.swap.json`, lists the moves). A failed or killed run therefore
leaves the previous complete outputs, manifest and `config.json` as they were.

Training checkpoints are resume state: once their stage is complete nothing
reads them (a rerun under another fingerprint starts over), so they are
deleted before the swap and a finished run keeps only models and records.

Before a stage runs, the pipeline discards its staging directory if it was
started under another fingerprint (`.staging/<name>.started.json`): after a
kill the stage resumes its own partial work, after a config or input change it
starts over. One run at a time holds the work directory (`.lock`). A work
directory the run cannot write is only inspected: when every stage asked for
is complete it says so and writes nothing, else one line says what must run.

In a multi-process run (one process per host) process 0 alone keeps this
bookkeeping (the lock, staging, the journal, manifests) and decides which
stages run; the others follow its decisions and wait for it at barriers
(processes.py).

Each stage is called with a `StageContext`: the config, its staging directory
and the run's device mesh, which `run_pipeline` builds once from `config.mesh`
(`sharding.mesh_from_config`) for every stage it runs.

The work directory may be a gs:// URL (storage.py). Cloud Storage has no
symlinks and no rename: there a staging directory holds server-side copies of
what the stage reads (listed in `.staging/<name>.mirrored.json`), and the swap
copies the stage's paths in, marking each done in the journal, before the
staging copies are deleted; a kill anywhere is completed by the next run as
locally. The lock is created with the precondition ifGenerationMatch=0.

Stages are referenced by module path so that this file does not import every
stage's dependencies up front.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import itertools
import json
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional

import ml_collections

from cai_jax import artifacts, errors, host_memory, interrupts, processes, storage
from cai_jax.errors import DivergenceError, UserError

if TYPE_CHECKING:
    from jax.sharding import Mesh

# <workdir>/.staging/<stage>/: a stage's work until it is complete (named in
# storage.py, which model references read it from too)
STAGING = storage.STAGING
LOCK = ".lock"
CONFIG = "config.json"  # the config of the last run whose stages all finished


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage as the pipeline sees it (paths relative to the work directory)."""

    name: str
    run: str  # "module:function", StageContext -> summary dict
    config: tuple[str, ...]  # config sections its result depends on
    inputs: tuple[str, ...] = ()  # files or model directories it reads
    # Config keys ("section.field") naming a model reference: a run's own model
    # (sl_cai, pm, rl_cai) named there is an input too (model_ref.run_model_dir).
    model_keys: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # what it makes; a missing or changed one makes it rerun
    # Outputs it makes only when a config field ("section.field") is non-zero.
    outputs_if: tuple[tuple[str, str], ...] = ()
    scratch: tuple[str, ...] = ()  # partial work it resumes; discarded when its fingerprint changed
    owns: tuple[str, ...] = ()  # anything else it writes (logs, plots), swapped in with its outputs

    def owned(self) -> list[str]:
        """The topmost paths the stage writes (models/rl_cai covers models/rl_cai/x)."""
        paths = set(self.outputs) | {rel for rel, _ in self.outputs_if} | set(self.scratch) | set(self.owns)
        return sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths))


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sl_generate", "cai_jax.sl_cai.generate:run_stage",
          ("seed", "model", "sampling", "constitution", "data", "sl_generate"),
          outputs=("sl_data.jsonl", "helpful_data.jsonl"),
          scratch=("sl_data.jsonl.partial", "helpful_data.jsonl.partial")),
    Stage("sl_train", "cai_jax.sl_cai.sft:run_stage", ("seed", "model", "data", "sl_train"),
          inputs=("sl_data.jsonl", "helpful_data.jsonl"), outputs=("models/sl_cai",), scratch=("sl_train",)),
    Stage("pairs", "cai_jax.rl_cai.pairs:run_stage",
          ("seed", "model", "sampling", "constitution", "data", "pairs"),
          model_keys=("pairs.model_source",), outputs=("pairs.jsonl",), scratch=("pairs.jsonl.partial",)),
    Stage("feedback", "cai_jax.rl_cai.feedback:run_stage",
          ("seed", "model", "data", "constitution", "feedback"),
          inputs=("pairs.jsonl",), model_keys=("feedback.model_source",), outputs=("labels.jsonl",),
          scratch=("labels.jsonl.partial",)),
    Stage("pm_train", "cai_jax.rl_cai.preference:run_stage", ("seed", "model", "data", "pm_train"),
          inputs=("labels.jsonl",), model_keys=("pm_train.init_source",), outputs=("models/pm",),
          outputs_if=(("models/pm_judge", "pm_train.judge_fraction"),), scratch=("pm_train",)),
    Stage("ppo", "cai_jax.rl_cai.ppo:run_stage", ("seed", "data", "ppo"),
          model_keys=("ppo.policy", "ppo.preference_model"), outputs=("models/rl_cai",), scratch=("ppo",)),
    Stage("eval", "cai_jax.eval.evaluate:run_stage", ("seed", "model", "data", "eval"),
          inputs=("models/sl_cai", "models/pm"), model_keys=("eval.harmless_judge", "eval.reward_pm_judge"),
          outputs=("eval/elo.json", "report.md"),
          owns=("eval",)),
)}
ORDER = tuple(STAGES)


@dataclasses.dataclass
class StageContext:
    """What a stage gets: the full config, the work directory, the run's mesh
    and display options.

    `mesh` is the run's device mesh (`run_mesh`), built once per run; a stage
    called directly (tests) gets one from `sharding.mesh_from_config(config)`.
    """

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Optional["Mesh"]
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
    try:
        with storage.open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:  # also when it goes between a look and the open (a lock released)
        return None
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


def _constitution_content(section, seed: int = 0) -> str:
    """A constitution by its text, not its path: "default" is package data
    that changes with the code, a JSON file can be edited in place, and the same
    file elsewhere (a moved checkout or work directory) is the same constitution."""
    from cai_jax.constitution import constitution_from_config

    content = dataclasses.asdict(constitution_from_config(section, seed))
    content.pop("source")  # where it was read from, which no stage uses
    return artifacts.fingerprint(content)


def _by_content(value):
    """A config section with each file it names (prompt files, pair files, ...)
    replaced by its name and the hash of its content: a file edited in place
    counts as a change, the same file in another directory does not. (Its name
    does count: prompts read from a file are named `<file name>:<line>`.)"""
    if isinstance(value, dict):
        return {k: _by_content(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_by_content(v) for v in value]
    if isinstance(value, str) and value and os.path.isfile(value):
        return {"file": os.path.basename(value), "content": artifacts.file_hash(value)}
    return value


def _section_values(config, names) -> dict:
    """The config sections a stage depends on, as they count for its
    fingerprint: the constitutions they name by content, not path."""
    values = _sections(config, names)
    if "constitution" in values:
        values["constitution"]["path"] = _constitution_content(config.constitution, config.seed)
    judge = values.get("eval", {}).get("feedback_judge")
    if judge and judge.get("constitution"):
        with contextlib.suppress(OSError, ValueError):  # one eval does not read is not checked
            judge["constitution"] = _constitution_content(
                ml_collections.ConfigDict({"path": judge["constitution"], "num_principles": None}))
    return values


def stage_inputs(config, name: str) -> tuple[str, ...]:
    """The stage's inputs: its fixed ones and the run models its config names."""
    from cai_jax.model_ref import run_model_dir

    stage, named = STAGES[name], []
    for key in stage.model_keys:
        rel = run_model_dir(str(_config_value(config, key)))
        if rel is not None:
            named.append(rel)
    return tuple(dict.fromkeys(stage.inputs + tuple(named)))


def stage_fingerprint(config, workdir: str, name: str) -> dict:
    """What a stage's result depends on: its config sections (the constitution
    and any file a section names by content, wherever they lie), its inputs'
    content, and what every earlier stage made (a rerun upstream invalidates it)."""
    stage = STAGES[name]
    sections = {k: artifacts.fingerprint(_by_content(v)) for k, v in _section_values(config, stage.config).items()}
    return {"config": sections,
            "inputs": {rel: artifacts.content_fingerprint(os.path.join(workdir, rel))
                       for rel in stage_inputs(config, name)},
            "upstream": {s: _made(workdir, s) for s in ORDER[:ORDER.index(name)]}}


def stage_outputs(config, name: str) -> tuple[str, ...]:
    """What the stage makes under this config: its fixed outputs and those its
    config asks for."""
    stage = STAGES[name]
    return stage.outputs + tuple(rel for rel, key in stage.outputs_if if _config_value(config, key))


def _config_value(config, key: str):
    section, field = key.split(".")
    return config[section][field]


def output_fingerprints(workdir: str, outputs) -> dict[str, Optional[str]]:
    return {rel: artifacts.content_fingerprint(os.path.join(workdir, rel)) for rel in outputs}


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
    # The outputs this stage made when it ran (its config, checked above, is unchanged).
    made = tuple(dict.fromkeys(STAGES[name].outputs + tuple(manifest["outputs"])))
    for rel, value in output_fingerprints(workdir, made).items():
        if value is None:
            return f"{rel} is missing"
        if value != manifest["outputs"].get(rel):
            return f"{rel} changed since it was made"
    return None


# ------------------------------------------------------------------ staging and swap-in

def staging_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, STAGING, name)


def home_of(path: str) -> str:
    """The work directory a stage's staging directory belongs to (any other
    path unchanged): what reports and messages should name."""
    path = storage.abspath(path)
    parent = storage.dirname(path)
    return storage.dirname(parent) if storage.basename(parent) == STAGING else path


def started_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, STAGING, f"{name}.started.json")


def _journal_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, STAGING, f"{name}.swap.json")


def _mirrored_path(workdir: str, name: str) -> str:
    """On Cloud Storage: the paths in a staging directory that are copies (_mirror)."""
    return os.path.join(workdir, STAGING, f"{name}.mirrored.json")


def _discard_staging(workdir: str, name: str) -> None:
    storage.rmtree(staging_dir(workdir, name))
    with contextlib.suppress(FileNotFoundError):
        storage.remove(_mirrored_path(workdir, name))


def discard_stale_scratch(workdir: str, name: str, fingerprint: dict) -> bool:
    """Removes the stage's staging directory when it was started under another
    fingerprint.

    Resuming is right after a kill, wrong after the config or inputs changed:
    the old checkpoints would be restored into the new run. The fingerprint the
    staging directory was started under is kept beside it. Returns whether
    anything was discarded.
    """
    marker = started_path(workdir, name)
    started = _read_json(marker)
    # Without a marker the staging directory's origin is unknown: also stale.
    stale = started != fingerprint and storage.exists(staging_dir(workdir, name))
    if stale:
        _discard_staging(workdir, name)
    if started != fingerprint:
        artifacts.write_json_atomic(marker, fingerprint)
    return stale


def _mirror(src: str, dst: str, owned: list[str], copied: Optional[list[str]] = None) -> None:
    """Fills `dst` with symlinks to what `src` holds, except the owned paths
    (relative), which start absent; a directory holding an owned path is a real
    directory in `dst`, mirrored the same way one level down. On Cloud Storage
    (`copied`: the list of paths copied so far, kept in `<stage>.mirrored.json`)
    each entry is copied instead, server-side."""
    storage.makedirs(dst)
    below: dict[str, list[str]] = {}
    for rel in owned:
        head, _, rest = rel.partition("/")
        below.setdefault(head, []).append(rest)
    for entry in sorted(storage.listdir(src)) if storage.isdir(src) else []:
        target, link, rests = os.path.join(src, entry), os.path.join(dst, entry), below.get(entry)
        if entry in (STAGING, LOCK) or entry.startswith(LOCK + ".") or (rests is not None and "" in rests):
            continue  # the pipeline's, or the stage's own: it writes that afresh
        if rests is None:
            if copied is not None:
                if link not in copied:
                    storage.copy_tree(target, link)
                    copied.append(link)
                    artifacts.write_json_atomic(_mirrored_path(*_staging_parts(dst)), copied)
            elif not os.path.lexists(link):
                with contextlib.suppress(FileExistsError):  # another process of the run made it
                    os.symlink(target, link)
        elif storage.isdir(target):
            _mirror(target, link, rests, copied)


def _staging_parts(path: str) -> tuple[str, str]:
    """(work directory, stage) of a path inside `<workdir>/.staging/<stage>/`."""
    parts = path.split("/")
    i = parts.index(STAGING)
    return "/".join(parts[:i]), parts[i + 1]


def _made_in_staging(staging: str, owned: list[str]) -> list[str]:
    """Every path the stage wrote in its staging directory: whatever there is
    not a symlink (on Cloud Storage: not a copy _mirror made), below the
    directories that hold an owned path."""
    holders = {"/".join(rel.split("/")[:i]) for rel in owned for i in range(1, rel.count("/") + 1)}
    copies = set(_read_json(_mirrored_path(*_staging_parts(staging))) or []) \
        if storage.is_remote(staging) else set()
    made = []

    def walk(rel: str) -> None:
        for entry in sorted(storage.listdir(os.path.join(staging, rel))):
            path = f"{rel}/{entry}" if rel else entry
            full = os.path.join(staging, path)
            if storage.islink(full) or full in copies:
                continue
            if path in holders and storage.isdir(full):
                walk(path)
            else:
                made.append(path)
    if storage.isdir(staging):
        walk("")
    return made


def drop_training_checkpoints(staging: str, scratch: tuple[str, ...]) -> None:
    """Deletes the training checkpoints under a finished stage's scratch paths
    (each directory with its checksums file beside it) and those files."""
    for rel in scratch:
        top = os.path.join(staging, rel)
        if not storage.isdir(top) or storage.islink(top):
            continue
        for parent, dirs, files in storage.walk(top):
            for name in files:
                if name.endswith(artifacts.CHECKSUMS_SUFFIX):
                    storage.rmtree(os.path.join(parent, name[:-len(artifacts.CHECKSUMS_SUFFIX)]))
                    storage.remove(os.path.join(parent, name))
            dirs[:] = [d for d in dirs if storage.isdir(os.path.join(parent, d))]


def _swap_in(workdir: str, name: str, manifest: dict) -> None:
    """Moves a finished stage's paths from staging into the work directory
    (the old ones aside) and writes its manifest, through a journal so that a
    kill in between is completed by the next run (finish_swap)."""
    staging, owned = staging_dir(workdir, name), STAGES[name].owned()
    storage.rmtree(os.path.join(workdir, STAGING, f"{name}.old"))
    made = [p for p in _made_in_staging(staging, owned) if p != CONFIG]
    paths = owned + [p for p in made if p not in owned]
    artifacts.write_json_atomic(_journal_path(workdir, name),
                                {"paths": paths, "made": made, "manifest": manifest})
    finish_swap(workdir, name)


def finish_swap(workdir: str, name: str) -> bool:
    """Completes the swap its journal describes, if there is one; each move is
    done once (the journal lists those done), so this is safe to repeat after a
    kill. Returns whether it swapped.

    On Cloud Storage a move is a copy: the old path is deleted, the new one
    copied in and marked done, and the staging copies go with the staging
    directory at the end (a copy cut short is redone whole)."""
    journal = _read_json(_journal_path(workdir, name))
    if not journal or not isinstance(journal.get("paths"), list):
        return False
    staging, aside = staging_dir(workdir, name), os.path.join(workdir, STAGING, f"{name}.old")
    remote = storage.is_remote(workdir)
    done = journal.setdefault("done", [])
    for rel in journal["paths"]:
        new, real = os.path.join(staging, rel), os.path.join(workdir, rel)
        made = rel in journal["made"]
        if rel in done or (made and not storage.lexists(new)):
            continue  # moved in before the kill
        if remote:
            storage.rmtree(real)  # an object or all below a prefix: nothing to put aside
        elif os.path.lexists(real):
            os.makedirs(os.path.dirname(os.path.join(aside, rel)), exist_ok=True)
            os.replace(real, os.path.join(aside, rel))
        if made:
            if remote:
                storage.copy_tree(new, real)
            else:
                os.makedirs(os.path.dirname(real), exist_ok=True)
                os.replace(new, real)
            artifacts.follow_umask(real)  # temp files and dirs are made private
        done.append(rel)
        artifacts.write_json_atomic(_journal_path(workdir, name), journal)
    artifacts.write_json_atomic(_manifest_path(workdir, name), journal["manifest"])
    storage.remove(_journal_path(workdir, name))
    _discard_staging(workdir, name)
    storage.rmtree(aside)
    if storage.exists(started_path(workdir, name)):
        storage.remove(started_path(workdir, name))
    return True


def _run_stage(ctx: StageContext, name: str, fingerprint: dict) -> dict:
    """Runs one stage in its staging directory (resuming its partial work when
    started under the same fingerprint), then swaps its paths in and writes its
    manifest; returns the row."""
    missing = [rel for rel, value in fingerprint["inputs"].items() if value is None]
    if missing:
        raise UserError(f"stage {name} needs {', '.join(missing)} in {ctx.workdir}; run the earlier "
                        "stages first (or all stages)")
    staging = staging_dir(ctx.workdir, name)
    if processes.is_writer():
        if discard_stale_scratch(ctx.workdir, name, fingerprint):
            print(f"{name}: discarded partial work started under another config or inputs", flush=True)
        copied = (_read_json(_mirrored_path(ctx.workdir, name)) or []) if storage.is_remote(staging) else None
        _mirror(ctx.workdir, staging, STAGES[name].owned(), copied)
        # The stage sees this run's config.json (the report reads it), not the last
        # complete run's; the work directory's copy is written after success.
        with contextlib.suppress(FileNotFoundError):
            storage.remove(os.path.join(staging, CONFIG))
        artifacts.write_json_atomic(os.path.join(staging, CONFIG), ctx.config.to_dict())
    processes.barrier(f"staging {name}")  # the other processes read the staging directory process 0 made
    start = time.time()
    print(f"== stage {name}", flush=True)
    try:
        summary = _resolve(STAGES[name].run)(dataclasses.replace(ctx, workdir=staging)) or {}
    except DivergenceError as e:
        raise DivergenceError(f"stage {name}: {e}") from e
    finally:
        # Each stage loads its own models: what this one held goes back to the
        # OS before the next starts (host_memory.py).
        host_memory.release()
    seconds = round(time.time() - start, 1)
    processes.barrier(f"finished {name}")  # every process has written its part (checkpoint shards)
    if processes.is_writer():
        drop_training_checkpoints(staging, STAGES[name].scratch)
        outputs = output_fingerprints(staging, stage_outputs(ctx.config, name))
        absent = [rel for rel, value in outputs.items() if value is None]
        if absent:
            raise RuntimeError(f"stage {name} finished without writing {absent} in {staging}")
        manifest = {"stage": name, "fingerprint": fingerprint, "outputs": outputs, "seconds": seconds,
                    "summary": summary}
        with interrupts.deferred():  # Ctrl-C waits for the swap-in (a second one does not)
            _swap_in(ctx.workdir, name, manifest)
    processes.barrier(f"swap-in {name}")  # the other processes read what was swapped in
    return {"stage": name, "status": f"done in {seconds}s", "seconds": seconds, **summary}


# ------------------------------------------------------------------ the work directory's lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _create(path: str, content: dict) -> bool:
    """Creates `path` with its content in one step (no reader sees it empty;
    locally a link of a complete temp file, on Cloud Storage an upload with
    ifGenerationMatch=0); False when it exists."""
    return storage.create_exclusive(path, json.dumps(content, indent=1, sort_keys=True).encode() + b"\n")


def _take_over(path: str, stale: dict, me: dict) -> bool:
    """Replaces the stale lock, as read (`stale`), by `me`; False when the lock
    is no longer what was read (another process took it over first).

    "Replace it only if it is still the one I read" is what makes this safe
    when several processes find the same stale lock: removing it and creating
    a new one let a late process remove the lock another had just taken. POSIX
    has no such conditional rename, so one process at a time may replace a
    given lock: the one that creates its claim `<lock>.<id>.claim<k>` (id: a
    fingerprint of the lock's content, unique by its token), which then checks
    the lock is unchanged and renames its own over it. A claimant that died
    leaves its claim behind; the next process tries claim k + 1. On Cloud
    Storage the same steps run on objects: a claim is created with
    ifGenerationMatch=0 (`_create`), the replacement is one upload.
    """
    stale_id = artifacts.fingerprint(stale)
    for k in itertools.count(1):
        claim = f"{path}.{stale_id}.claim{k}"
        if _create(claim, me):
            break
        claimant = _read_json(claim)
        if claimant is None:
            return False  # done and cleared by the process that took it over
        if isinstance(claimant.get("pid"), int) and _alive(claimant["pid"]):
            time.sleep(0.01)  # another process is taking it over: wait for it
            return False
    won = False
    try:
        if _read_json(path) == stale:
            artifacts.write_json_atomic(path, me)
            won = True
        return won
    finally:
        # Late claims of a replaced lock find it changed and give up: safe to remove.
        prefix = f"{storage.basename(path)}.{stale_id}.claim"
        claims = [storage.join(storage.dirname(path), c) for c in storage.listdir(storage.dirname(path))
                  if c.startswith(prefix) and c[len(prefix):].isdigit()] if won else [claim]
        for leftover in claims:
            with contextlib.suppress(FileNotFoundError):
                storage.remove(leftover)


def _acquire(workdir: str, path: str, me: dict) -> None:
    while not _create(path, me):
        holder = _read_json(path)
        if holder is None:
            continue  # released meanwhile
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host and (host != me["host"] or _alive(pid)):
            raise UserError(f"work directory {workdir} is in use by pid {pid} on {host} (lock {path}); "
                            "wait for that run to end, or delete the lock if it is gone")
        if _take_over(path, holder, me):
            print(f"taking over the stale lock {path} of pid {pid} on {host} (no longer running)", flush=True)
            return


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `<workdir>/.lock` (this pid and host, and a token unique to this
    hold) while the block runs, and yields its content. A lock whose pid is
    dead on this host is stale and taken over; a live one is a UserError
    naming its pid and host."""
    path = storage.join(workdir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    held = False
    try:
        with interrupts.deferred():  # Ctrl-C never leaves a lock behind
            try:
                _acquire(workdir, path, me)
            except OSError as e:
                if storage.is_remote(path) and e.errno is None:  # gcsfs: refused (403) or a bad request
                    raise UserError(f"cannot write the lock {path}: {' '.join(str(e).split())[:300]}; check "
                                    "the bucket's permissions or choose another --workdir") from e
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                raise UserError(f"cannot write the lock {path}: {e.strerror}; make {workdir} writable or "
                                "choose another --workdir") from e
            held = True
        yield me
    finally:
        if held:
            with interrupts.deferred():
                if _read_json(path) == me:
                    storage.remove(path)


def run_mesh(config) -> Optional["Mesh"]:
    """The run's device mesh, handed to every stage: config.mesh over every
    device of every process, so a multi-process run calls this after
    `jax.distributed` is initialised (main.py does). None for a config
    without a mesh section, whose stages use none (the pipeline's own tests
    run such stages without importing JAX)."""
    if "mesh" not in config:
        return None
    from cai_jax import sharding

    return sharding.mesh_from_config(config)


def run_pipeline(config, workdir: str, stages: Optional[list[str]] = None, progress: bool = True,
                 force: bool = False) -> list[dict[str, Any]]:
    """Runs the named stages (default: all, in recipe order) holding the work
    directory's lock, each with the run's mesh (`run_mesh`, built once here);
    returns one summary row per stage. `config.json` is written when they have
    all finished."""
    stages = list(stages or ORDER)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage {', '.join(map(repr, unknown))}; "
                        f"known: {','.join(ORDER)}")
    stages.sort(key=ORDER.index)
    # In a multi-process run process 0 makes, locks and keeps the work
    # directory; the others check that they see the same one (processes.py).
    writer = processes.is_writer()
    workdir = _make_workdir(workdir) if writer else storage.abspath(workdir)
    unwritable = processes.broadcast(_unwritable(workdir, stages) if writer else None)
    if unwritable is not None:
        return _inspect_read_only(config, workdir, stages, force, unwritable)
    lock = workdir_lock(workdir) if writer else contextlib.nullcontext()
    with errors.full_disk_in(workdir), lock as held:  # a full disk: one line naming the workdir's filesystem
        processes.check_shared_workdir(workdir, storage.join(workdir, LOCK), held and held["token"])
        for name in ORDER if writer else ():
            if finish_swap(workdir, name):
                print(f"{name}: completed the swap-in a kill had cut short", flush=True)
        processes.barrier("pipeline start")
        ctx = StageContext(config, workdir, run_mesh(config), progress)
        rows = [_stage_row(ctx, name, force) for name in stages]
        if writer:
            artifacts.write_json_atomic(os.path.join(workdir, CONFIG), config.to_dict())
            if not storage.is_remote(workdir):  # (Cloud Storage has no empty directories)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(workdir, STAGING))  # only when empty: nothing left in progress
        processes.barrier("pipeline end")  # the lock is released after every process is done
    return rows


def _stage_row(ctx: StageContext, name: str, force: bool) -> dict[str, Any]:
    """Skips the stage when complete (discarding a rerun's leftovers), else runs it."""
    with interrupts.during(f"stage {name}"):  # its start and end are where Ctrl-C stops a run
        return _skip_or_run(ctx, name, force)


def _skip_or_run(ctx: StageContext, name: str, force: bool) -> dict[str, Any]:
    # Process 0 decides for every process of the run, from the work directory it keeps.
    decision = processes.broadcast(_skip_or_fingerprint(ctx, name, force) if processes.is_writer() else None)
    if "skipped" in decision:
        return {"stage": name, "status": "skipped (complete)", **decision["skipped"]}
    return _run_stage(ctx, name, decision["fingerprint"])


def _skip_or_fingerprint(ctx: StageContext, name: str, force: bool) -> dict[str, Any]:
    """{"skipped": the manifest's summary} for a complete stage, else
    {"fingerprint": what it runs under}."""
    fingerprint = stage_fingerprint(ctx.config, ctx.workdir, name)
    if storage.exists(_manifest_path(ctx.workdir, name)):
        reason = "forced (--force)" if force else rerun_reason(ctx.workdir, name, fingerprint)
        if reason is None:
            # A failed rerun under another config left its staging: not ours any more.
            if _read_json(started_path(ctx.workdir, name)) not in (None, fingerprint):
                _discard_staging(ctx.workdir, name)
                storage.remove(started_path(ctx.workdir, name))
            return {"skipped": _read_json(_manifest_path(ctx.workdir, name))["summary"]}
        print(f"{name}: {reason}; rerunning", flush=True)
    return {"fingerprint": fingerprint}


# ------------------------------------------------------------ a work directory that cannot be written

def _make_workdir(workdir: str) -> str:
    """The work directory, made if absent, as an absolute path; a path that is
    no directory or cannot be made is a UserError."""
    if not workdir:
        raise UserError("--workdir is empty; name the directory the run's artifacts go in")
    if storage.is_remote(workdir):
        storage.check_bucket(workdir)  # one line when the bucket cannot be reached
        return storage.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a directory; name a directory (it is made if absent)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise  # a full disk has its own line (errors.py)
        raise UserError(f"cannot make the work directory {workdir}: {e.strerror}"
                        + (f" ({e.filename})" if e.filename and e.filename != workdir else "")) from e
    return os.path.abspath(workdir)


def _unwritable(workdir: str, stages) -> Optional[str]:
    """Why the run could not write what it must, or None: the first directory
    it writes in (the work directory, stages/, .staging/, the directories
    holding what the stages make and all below them: old versions move out and
    are deleted) that this process cannot write. (On Cloud Storage a refused
    write is its own error.)"""
    if storage.is_remote(workdir):
        return None
    dirs, trees = [workdir], [os.path.join(workdir, "stages"), os.path.join(workdir, STAGING)]
    for name in stages:
        for rel in STAGES[name].owned():
            parts = rel.split("/")
            dirs += [os.path.join(workdir, *parts[:i]) for i in range(1, len(parts))]
            trees.append(os.path.join(workdir, rel))
    for top in trees:
        dirs += [root for root, _, _ in os.walk(top)]  # nothing when absent or a file
    for path in dict.fromkeys(dirs):
        if os.path.isdir(path) and not os.path.islink(path) and \
                not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            readonly = os.statvfs(path).f_flag & os.ST_RDONLY
            return f"{path} is {'on a read-only file system' if readonly else 'not writable'}"
    return None


def _inspect_read_only(config, workdir: str, stages, force: bool, unwritable: str) -> list[dict[str, Any]]:
    """A run in a work directory it cannot write: the rows of the stages when
    all are complete (nothing written, not even the lock), else a UserError
    saying what would have to be written."""
    for name in ORDER:
        if storage.exists(_journal_path(workdir, name)):
            raise UserError(f"{unwritable}, and the run must finish the swap-in of stage {name} a kill cut "
                            "short; make it writable, then rerun")
    rows = []
    for name in stages:
        manifest = _read_json(_manifest_path(workdir, name))
        reason = "it has not run" if manifest is None else "forced (--force)" if force else \
            rerun_reason(workdir, name, stage_fingerprint(config, workdir, name))
        if reason is not None:
            raise UserError(f"{unwritable}, and stage {name} must run ({reason}); make it writable or choose "
                            "another --workdir")
        rows.append({"stage": name, "status": "skipped (complete)", **manifest.get("summary", {})})
    print(f"{unwritable}: every stage asked for is complete, so nothing was written", flush=True)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The stage table; rows with `seconds` (stages that ran) add up to a total row."""
    lines = ["| stage | status | key numbers |", "|---|---|---|"]
    for row in rows:
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                            if k not in ("stage", "status", "seconds"))
        lines.append(f"| {row['stage']} | {row['status']} | {numbers} |")
    timed = [row["seconds"] for row in rows if isinstance(row.get("seconds"), (int, float))]
    if timed:
        total = sum(timed)
        lines.append(f"| total | {total:.0f} s ({total / 60:.1f} min) in {len(timed)} stages |  |")
    return "\n".join(lines)


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
