"""Metric writers: a JSONL log (one object per step) and TensorBoard event files.

A writer killed mid-line leaves a torn last line; readers drop it with a
warning naming the file (the resumed run rewrites that step). The directory
may be a gs:// URL (storage.py): the log and the event files are then
rewritten whole at each flush (an object cannot grow).
"""
from __future__ import annotations

import io
import json
from typing import Mapping

import numpy as np

from cai_jax import artifacts, processes, storage


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
    """Appends {"step": s, **metrics} to `<dir>/<name>.jsonl` and to TensorBoard.

    On resume, lines with a step >= the restored step are dropped first so the
    log holds each step once. In a multi-process run only process 0 writes.
    """

    def __init__(self, directory: str, name: str = "metrics", tensorboard: bool = True):
        self.path = storage.join(directory, f"{name}.jsonl")
        self._tb = None
        self.writes = processes.is_writer()
        if self.writes:
            storage.makedirs(directory)
        if tensorboard and self.writes:
            from tensorboardX import SummaryWriter
            if storage.is_remote(directory):
                _events_through_storage()
            self._tb = SummaryWriter(storage.join(directory, "tensorboard", name))

    def truncate_from(self, step: int) -> None:
        if not self.writes or not storage.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", -1) < step]
        storage.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, metrics: Mapping) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if not self.writes:
            return
        storage.append(self.path, json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a JSONL log; a torn last line is dropped (with a warning),
    a bad line before it is an error naming the file and line."""
    return artifacts.read_jsonl(path, drop_torn_tail=True)


class _EventFile:
    """A TensorBoard event file on Cloud Storage, uploaded whole at each flush
    through storage.py (tensorboardX's own gs:// writer uses another client,
    which finds no emulator)."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        storage.write_atomic(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EventFiles:
    def open(self, path: str) -> _EventFile:
        return _EventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # no directories to make on Cloud Storage


def _events_through_storage() -> None:
    from tensorboardX import record_writer

    record_writer.register_writer_factory("gs", _EventFiles())
