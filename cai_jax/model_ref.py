"""Model references: the one place that turns a config's model name into weights.

Every config field that names a model (`pairs.model_source`,
`feedback.model_source`, `pm_train.init_source`, `ppo.policy`,
`ppo.preference_model`, the eval judges' models) takes the same references:

    base              config.model: the helpful model every stage starts from
    sl_cai, pm        the run's SL-CAI model and preference model (<workdir>/models/...)
    rl_cai[/step_K]   a PPO checkpoint of the run (without /step_K: the last one)
    smollm2, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct
                      the packaged models (weights/packaged.py)
    gguf:PATH, hf:DIR, ckpt:DIR, init:NAME
                      weights anywhere (weights/loader.py)
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Optional

RUN_MODELS = {"sl_cai": ("models/sl_cai", "sl_train"), "pm": ("models/pm", "pm_train"),
              "rl_cai": ("models/rl_cai", "ppo")}


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

    def load(self, overrides: Optional[dict] = None, seed: int = 0, to_device: bool = True):
        from cai_jax.weights.loader import load_model

        return load_model(self.source, {**dict(self.overrides), **(overrides or {})}, seed=seed,
                          to_device=to_device)


def directory_version(directory: str) -> str:
    """A short fingerprint of a model directory that changes with every save:
    the hash of its saved.json (a fresh id per save), or for directories
    without one, of its files' names, sizes and modification times."""
    from cai_jax import artifacts

    saved = os.path.join(directory, "saved.json")
    if os.path.exists(saved):
        return artifacts.file_hash(saved)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, directory)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def rl_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the complete step_K checkpoints under `directory`, by step."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = re.fullmatch(r"step_(\d+)", name)
        path = os.path.join(directory, name)
        if match and os.path.exists(os.path.join(path, "model.json")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _run_model(spec: str, workdir: Optional[str]) -> str:
    name, _, step = spec.partition("/")
    relative, stage = RUN_MODELS[name]
    if workdir is None:
        raise ValueError(f"model reference {spec!r} names a model of a run; it needs a work directory")
    path = os.path.join(workdir, relative)
    if name == "rl_cai":
        checkpoints = dict(rl_checkpoints(path))
        if step:
            path = os.path.join(path, step)
        elif checkpoints:
            path = checkpoints[max(checkpoints)]
    if not os.path.exists(os.path.join(path, "model.json")):
        raise FileNotFoundError(f"model reference {spec!r}: {path} holds no model; run the {stage} stage first")
    return "ckpt:" + os.path.abspath(path)


def resolve(spec: str, config, workdir: Optional[str] = None) -> ModelRef:
    """The ModelRef of `spec` (see the module docstring) under an experiment config."""
    from cai_jax.config import resolve_model
    from cai_jax.weights.loader import is_model_source

    if spec == "base":
        source, overrides = resolve_model(config.model)
        return ModelRef(spec, source, tuple(sorted(overrides.items())))
    if spec.partition("/")[0] in RUN_MODELS and (spec in RUN_MODELS or spec.startswith("rl_cai/step_")):
        return ModelRef(spec, _run_model(spec, workdir))
    if is_model_source(spec):
        return ModelRef(spec, spec)
    raise ValueError(f"model reference {spec!r} is not one of: base, sl_cai, pm, rl_cai[/step_K], a packaged "
                     "model name, gguf:PATH, hf:DIR, ckpt:DIR or init:NAME")
