"""Converted GGUF weights kept on disk, so a GGUF file is dequantized once.

Reading SmolLM2's GGUF header and dequantizing it into our layout takes about
7 s of every process; reading the converted float32 arrays back takes well
under one. An entry is a folder under `$CAI_JAX_CACHE/weights` holding one
.npy file per parameter and a manifest (config, shapes, dtypes and a checksum
of every array). It is keyed by the GGUF file's path, size and modification
time, the `gguf` package's version and the bytes of the conversion code, so a
changed file or converter makes a new entry; entries are written to a
temporary folder and renamed in whole, and checked against their manifest when
read (a damaged entry is converted again). `CAI_JAX_WEIGHTS_CACHE=0` turns
the cache off.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import warnings
import numpy as np

from cai_jax import storage
from cai_jax.models.config import TransformerConfig
from cai_jax.weights.cache import cache_dir, file_stamp, switched_on

ENV_SWITCH = "CAI_JAX_WEIGHTS_CACHE"
_FORMAT = 2  # bump when the entry layout below changes
# The code whose output is cached: editing any of these files makes new entries.
_CONVERSION_CODE = ("gguf_import.py", "layout.py", "views.py")


def _checksum(a: np.ndarray) -> int:
    """The sum of the array's bytes read as 32-bit words, modulo 2^64: any
    changed word, a flipped bit or a zeroed page changes it. CRC-32 of
    SmolLM2's 514 MB took 0.3 s of every start-up here (0.65 s with the first
    read of the pages), this sum about a third of that (issue #20)."""
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    words = raw[:raw.size - raw.size % 4].view(np.uint32)
    tail = int.from_bytes(raw[words.size * 4:].tobytes(), "little")
    return (int(np.sum(words, dtype=np.uint64)) + tail) % (1 << 64)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def source_key(path: str) -> dict:
    """What an entry must match to stand for `path` converted by today's code."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = hashlib.sha256()
    for name in _CONVERSION_CODE:
        with open(os.path.join(here, name), "rb") as f:
            code.update(f.read())
    return {"format": _FORMAT, **file_stamp(path), "gguf": importlib.metadata.version("gguf"),
            "code": code.hexdigest()[:16]}


def entry_dir(key: dict) -> str:
    stem = os.path.splitext(os.path.basename(key["source"]))[0]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "weights", f"{stem}-{digest}")


def read_entry(directory: str, key: dict) -> tuple[TransformerConfig, dict]:
    """Config and parameters of an entry, as copy-on-write memory maps; raises
    ValueError when the entry does not match `key` or its manifest."""
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("key") != key:
        raise ValueError("its key differs from the file's")
    flat = {}
    for name, want in manifest["arrays"].items():
        # Copy-on-write: a caller writing into a parameter never changes the entry.
        a = np.load(os.path.join(directory, name + ".npy"), mmap_mode="c")
        if list(a.shape) != want["shape"] or str(a.dtype) != want["dtype"]:
            raise ValueError(f"{name} is {a.dtype}{list(a.shape)}, manifest says {want['dtype']}{want['shape']}")
        if _checksum(a) != want["checksum"]:
            raise ValueError(f"{name} fails its checksum")
        flat[name] = a
    cfg = dict(manifest["config"], heads=tuple(manifest["config"]["heads"]))
    return TransformerConfig(**cfg), _unflatten(flat)


def write_entry(directory: str, key: dict, cfg: TransformerConfig, params: dict) -> None:
    """Writes an entry whole or not at all (a temporary folder renamed into
    place); a concurrent writer's entry, already there, is equal and kept."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    flat = _flatten(params)
    need = sum(np.asarray(a).nbytes for a in flat.values())
    free = shutil.disk_usage(parent).free
    if free < 2 * need:  # leave the disk at least as much room as the entry takes
        raise OSError(f"only {free / 1e9:.1f} GB free for a {need / 1e9:.1f} GB entry")
    with storage.local_directory_built(directory, keep_existing=True) as tmp:
        arrays = {}
        for name, a in flat.items():
            a = np.asarray(a)
            np.save(os.path.join(tmp, name + ".npy"), a)
            arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "checksum": _checksum(a)}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump({"key": key, "config": dataclasses.asdict(cfg), "arrays": arrays}, f, indent=1)


def _remove_older_entries(key: dict, keep: str) -> None:
    """Drops entries of the same GGUF path made before it (or its converter) changed."""
    root = os.path.dirname(keep)
    stem = os.path.basename(keep).rsplit("-", 1)[0]
    for name in os.listdir(root):
        other = os.path.join(root, name)
        if other == keep or name.startswith(".") or name.rsplit("-", 1)[0] != stem:
            continue
        try:
            with open(os.path.join(other, "manifest.json"), encoding="utf-8") as f:
                same_source = json.load(f)["key"]["source"] == key["source"]
        except (OSError, ValueError, KeyError):
            continue
        if same_source:
            shutil.rmtree(other, ignore_errors=True)


def _convert(path: str) -> tuple[TransformerConfig, dict]:
    from cai_jax.weights import gguf_import, layout

    cfg, tensors = gguf_import.read_gguf(path)
    return cfg, layout.from_hf(tensors, cfg, source=path)


def load_gguf(path: str) -> tuple[TransformerConfig, dict]:
    """Config and host parameters (our layout, float32) of a GGUF file, converted
    at most once per file and converter."""
    if not switched_on(ENV_SWITCH):
        return _convert(path)
    key = source_key(path)
    directory = entry_dir(key)
    if os.path.isdir(directory):
        try:
            return read_entry(directory, key)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"converted weights in {directory} are damaged ({type(e).__name__}: {e}); converting "
                          f"{path} again", RuntimeWarning, stacklevel=2)
            shutil.rmtree(directory, ignore_errors=True)
    cfg, params = _convert(path)
    try:
        write_entry(directory, key, cfg, params)
        _remove_older_entries(key, directory)
    except OSError as e:
        warnings.warn(f"converted weights of {path} not cached in {directory} ({e}); the next load "
                      f"converts again (set {ENV_SWITCH}=0 to silence this)", RuntimeWarning, stacklevel=2)
    return cfg, params
