"""The tensors of a directory's *.safetensors files, read one slice at a time.

A safetensors file is an 8-byte header length, a JSON header giving each
tensor's dtype, shape and byte range, then the row-major bytes. Reading a slice
here reads the rows it spans with plain file reads, a few tens of MB at a
time, and keeps only the requested columns: a process loading its shards of a
large model never holds (or maps) more of the file than one chunk beside the
shard it is filling. (safetensors' own `safe_open(...).get_slice` maps the
whole file and cannot return bfloat16 to NumPy, which is how most HF
checkpoints are stored.)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from cai_jax.weights import views

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file


def _read_header(path: str) -> dict[str, _Entry]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; "
                             f"floating point ({', '.join(_DTYPES)}) is read")
        entries[name] = _Entry(path, np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]),
                               8 + length + info["data_offsets"][0])
    return entries


class SafetensorsFiles:
    """HF-named tensors of some safetensors files, each read as float32 slices."""

    def __init__(self, paths):
        self._entries: dict[str, _Entry] = {}
        for path in paths:
            self._entries.update(_read_header(path))

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index] as float32 (index: one step-1 slice per axis)."""
        entry = self._entries[name]
        if not entry.shape:
            return self._read_rows(entry, 0, 1).reshape(()).astype(np.float32)
        box = views.box_of(index, entry.shape)
        (first, last), rest = box[0], tuple(slice(a, b) for a, b in box[1:])
        out = np.empty(tuple(b - a for a, b in box), np.float32)
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        step = max(1, _CHUNK_BYTES // max(1, row_bytes))
        for start in range(first, last, step):
            stop = min(last, start + step)
            out[start - first:stop - first] = self._read_rows(entry, start, stop)[(slice(None),) + rest]
        return out

    def view(self, name: str) -> views.View:
        return views.Stored(self.shape(name), lambda index: self.read(name, index))

    @staticmethod
    def _read_rows(entry: _Entry, start: int, stop: int) -> np.ndarray:
        row = math.prod(entry.shape[1:])
        with open(entry.path, "rb") as f:
            f.seek(entry.offset + start * row * entry.dtype.itemsize)
            raw = f.read((stop - start) * row * entry.dtype.itemsize)
        return np.frombuffer(raw, entry.dtype).reshape((stop - start,) + entry.shape[1:])


def open_directory(directory: str) -> SafetensorsFiles:
    paths = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not paths:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (PyTorch .bin is not read)")
    return SafetensorsFiles(paths)
