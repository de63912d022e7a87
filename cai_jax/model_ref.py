"""Model references: the one place that turns a config's model name into weights.

Every config field that names a model (`pairs.model_source`,
`feedback.model_source`, `pm_train.init_source`, `ppo.policy`,
`ppo.preference_model`, the eval judges' models) takes the same references:

    base              config.model: the helpful model every stage starts from
    sl_cai, pm        the run's SL-CAI model and preference model (<workdir>/models/...)
    pm_judge          the run's second preference model, trained on other prompts'
                      labels than pm (pm_train.judge_fraction): an independent judge
    rl_cai[/step_K]   a PPO checkpoint of the run, as the ppo stage recorded it in
                      models/rl_cai/checkpoints.json (without /step_K: the last one)
    smollm2, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct
                      the packaged models (weights/packaged.py)
    gguf:PATH, hf:DIR, ckpt:DIR, init:NAME
                      weights anywhere (weights/loader.py)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from cai_jax import storage

RUN_MODELS = {"sl_cai": ("models/sl_cai", "sl_train"), "pm": ("models/pm", "pm_train"),
              "pm_judge": ("models/pm_judge", "pm_train"), "rl_cai": ("models/rl_cai", "ppo")}
CHECKPOINTS_FILE = "checkpoints.json"  # the PPO checkpoints a run wrote: models/rl_cai/checkpoints.json


@dataclasses.dataclass(frozen=True)
class ModelRef:
    spec: str  # the reference as the config wrote it
    source: str  # what load_model reads
    overrides: tuple = ()  # (field, value) pairs for load_model (the base model's runtime fields)

    @property
    def directory(self) -> Optional[str]:
        """The directory holding the weights, for sources that are one."""
        kind, _, rest = self.source.partition(":")
        return rest if kind in ("ckpt", "hf") else None

    def version(self, seed: int) -> str:
        """A fingerprint that changes when the weights behind the reference do
        (a directory is re-saved), for caches keyed on the model."""
        text = f"{self.source}|{list(self.overrides)}|seed={seed}"
        return text + ("|" + directory_version(self.directory) if self.directory else "")

    def load(self, overrides: Optional[dict] = None, seed: int = 0, to_device: bool = True,
             mesh=None, rules=None):
        """The weights (weights/loader.py's load_model): with a `mesh`, placed
        on it, each process reading only its own devices' slices."""
        from cai_jax.weights.loader import load_model

        return load_model(self.source, {**dict(self.overrides), **(overrides or {})}, seed=seed,
                          to_device=to_device, mesh=mesh, rules=rules)


def directory_version(directory: str) -> str:
    """A short fingerprint of a model directory that changes when its weights
    do: the fingerprint its seal records (saved.json: the parameters' values,
    not orbax's file names, so the same weights saved again keep it), the hash
    of an older model's saved.json (a fresh id per save), or for directories
    without one, of its files' names, sizes and modification times."""
    from cai_jax import artifacts

    saved = artifacts.path_fingerprint(directory)
    if saved is not None:
        return saved
    listing = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            st = os.stat(path)
            listing.append((os.path.relpath(path, directory), st.st_size, st.st_mtime_ns))
    return artifacts.fingerprint(listing)


def _checkpoints_path(directory: str) -> str:
    return storage.join(directory, CHECKPOINTS_FILE)


def _recorded(directory: str) -> dict[int, str]:
    """{step: path relative to `directory`} from its checkpoints.json ({} when absent)."""
    path = _checkpoints_path(directory)
    if not storage.exists(path):
        return {}
    with storage.open(path) as f:
        document = json.load(f)
    try:
        return {int(c["step"]): str(c["path"]) for c in document["checkpoints"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed ({e!r}); expected {{\"checkpoints\": [{{\"step\", "
                         "\"path\"}, ...]}, as the ppo stage writes it") from None


def record_rl_checkpoint(directory: str, step: int, path: str) -> None:
    """Adds the PPO checkpoint `path` (a model directory saved under
    `directory`) to `directory/checkpoints.json`, atomically. The ppo stage
    calls it after each save; eval and `rl_cai[/step_K]` read only this list."""
    from cai_jax import artifacts

    recorded = _recorded(directory)
    recorded[int(step)] = storage.relpath(path, directory)
    artifacts.write_json_atomic(_checkpoints_path(directory), {
        "checkpoints": [{"step": s, "path": p} for s, p in sorted(recorded.items())]})


def rl_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the PPO checkpoints recorded in `directory/checkpoints.json`,
    by step ([] when nothing was recorded). A recorded checkpoint that holds no
    model is an error naming it. Paths are real paths: a stage runs in a staging
    directory where the run's models are symlinks, and what it records (eval's
    model sources, cache keys) must not depend on that."""
    found = []
    for step, rel in sorted(_recorded(directory).items()):
        path = storage.join(directory, rel)
        if not storage.exists(storage.join(path, "model.json")):
            raise FileNotFoundError(f"{_checkpoints_path(directory)} records step {step} at {path}, "
                                    "which holds no model; rerun the ppo stage")
        found.append((step, _real(path)))
    return found


def _run_model(spec: str, workdir: Optional[str]) -> str:
    name, _, step = spec.partition("/")
    relative, stage = RUN_MODELS[name]
    if workdir is None:
        raise ValueError(f"model reference {spec!r} names a model of a run; it needs a work directory")
    path = storage.join(workdir, relative)
    if name == "rl_cai":
        if step and not step[len("step_"):].isdigit():
            raise ValueError(f"model reference {spec!r}: expected rl_cai/step_K with K a number")
        checkpoints = dict(rl_checkpoints(path))
        wanted = int(step[len("step_"):]) if step else max(checkpoints, default=None)
        if wanted not in checkpoints:
            raise FileNotFoundError(f"model reference {spec!r}: {_checkpoints_path(path)} records "
                                    f"steps {sorted(checkpoints)}; run the {stage} stage first")
        path = checkpoints[wanted]
    if not storage.exists(storage.join(path, "model.json")):
        raise FileNotFoundError(f"model reference {spec!r}: {path} holds no model; run the {stage} stage first")
    return "ckpt:" + _real(path)


def _real(path: str) -> str:
    """Where a run's model lies in its work directory: a stage runs in a
    staging directory where the run's models are symlinks (os.path.realpath),
    or on Cloud Storage copies, named by the place they were copied from."""
    if storage.is_remote(path):
        return storage.outside_staging(path)
    return os.path.realpath(path)


def run_model_dir(spec: str) -> Optional[str]:
    """The work-directory path of the run's own model that `spec` names
    (models/sl_cai, models/pm, models/rl_cai), or None for any other reference."""
    name = spec.partition("/")[0]
    if name in RUN_MODELS and (spec in RUN_MODELS or spec.startswith("rl_cai/step_")):
        return RUN_MODELS[name][0]
    return None


def resolve(spec: str, config, workdir: Optional[str] = None) -> ModelRef:
    """The ModelRef of `spec` (see the module docstring) under an experiment config."""
    from cai_jax.config import resolve_model
    from cai_jax.weights.loader import is_model_source

    if spec == "base":
        source, overrides = resolve_model(config.model)
        return ModelRef(spec, source, tuple(sorted(overrides.items())))
    if run_model_dir(spec) is not None:
        return ModelRef(spec, _run_model(spec, workdir))
    if is_model_source(spec):
        return ModelRef(spec, spec)
    raise ValueError(f"model reference {spec!r} is not one of: base, sl_cai, pm, rl_cai[/step_K], a packaged "
                     "model name, gguf:PATH, hf:DIR, ckpt:DIR or init:NAME")
