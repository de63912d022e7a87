"""The processes of one run: who writes, waiting for each other, and stopping together.

A multi-process run (`config.distributed.enabled`, one process per host) runs
the same program in every process on global arrays. This module holds what
the rest of the code asks about the others, so that no stage looks at
`jax.process_index()` itself:

- `is_writer()`: process 0 writes every file of the run (artifacts, manifests,
  metrics, plots, the report, the lock, the journal); the others compute the
  same values and read what it wrote after a `barrier`.
- `barrier(tag)`, `broadcast(value)`: through the coordination service's
  key-value store (JSON values), not device collectives.
- `to_host(x)`: a global array's value on every process (a collective, so
  every process calls it at the same point).
- `check_shared_workdir`: every process must see process 0's work directory.
- `watch()` / `run_and_report`: a lost process or a failed one stops the
  others within `config.distributed.heartbeat_timeout_seconds` with one line,
  instead of a hang in a collective. JAX's own coordination service notices a
  dead process only after its heartbeat timeout (100 s by default) and then
  aborts every process with a C++ stack trace, so the watch here uses its own
  heartbeats through the key-value store, with a shorter timeout, and JAX's
  (at least twice as long, distributed.py) stays as the backstop.

With one process every function here is a no-op that needs no JAX.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from typing import Callable, Optional, TypeVar

from cai_jax import storage
from cai_jax.errors import UserError

T = TypeVar("T")

_PREFIX = "cai_jax/"
_KV_TIMEOUT_MS = 24 * 3600 * 1000  # waiting on other processes: the watch ends a wait on a lost one
_calls = itertools.count()  # barrier and broadcast keys: every process makes the same calls in order
_watch: Optional["_Watch"] = None
EXIT_PROCESS_LOST = 1


def _client():
    """The coordination service's client, or None in a single-process run."""
    if "jax" not in sys.modules:  # JAX not imported: it cannot be distributed
        return None
    from jax._src import distributed
    return distributed.global_state.client


def count() -> int:
    return 1 if _client() is None else _state().num_processes


def index() -> int:
    return 0 if _client() is None else _state().process_id


def _state():
    from jax._src import distributed
    return distributed.global_state


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0, or the only one."""
    return index() == 0


def barrier(tag: str) -> None:
    """Waits until every process has reached the same barrier."""
    client = _client()
    if client is not None:
        client.wait_at_barrier(f"{_PREFIX}barrier/{next(_calls)}/{tag}", _KV_TIMEOUT_MS)


def broadcast(value: T) -> T:
    """Process 0's value (JSON-serialisable) on every process."""
    client = _client()
    if client is None:
        return value
    key = f"{_PREFIX}broadcast/{next(_calls)}"
    if is_writer():
        client.key_value_set(key, json.dumps(value))
        return value
    return json.loads(client.blocking_key_value_get(key, _KV_TIMEOUT_MS))


def to_host(x):
    """The whole value of `x` as numpy on this process: a global array spread
    over several processes' devices is gathered (every process calls this at
    the same point); anything else is converted as it is."""
    import numpy as np
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def put_batch(batch, sharding):
    """A host batch that every process holds whole, as a global array split
    over `sharding` (a sharding or a pytree of them); unchanged with one
    process, where jit places host arrays itself."""
    if count() == 1:
        return batch
    import jax
    return jax.device_put(batch, sharding)


def tree_to_host(tree):
    import jax
    return jax.tree.map(to_host, tree)


# ------------------------------------------------------------------ a stage's record log

def open_records(path: str, key: str = "id"):
    """A stage's resumable record log (artifacts.PartialJsonl) for process 0;
    for the others, a copy of the records it holds at the start that writes
    nothing (they compute the same records, process 0 writes them). The copy
    is read after process 0 has dropped a torn tail and before it appends."""
    from cai_jax import artifacts

    log = artifacts.PartialJsonl(path, key=key) if is_writer() else None
    barrier(f"open {path}")
    if log is None:
        log = _RecordsCopy(path, key)
    barrier(f"opened {path}")
    return log


class _RecordsCopy:
    """PartialJsonl's reading half: the records, in memory only."""

    def __init__(self, path: str, key: str):
        from cai_jax import artifacts

        self.key, partial = key, path + ".partial"
        self.records = artifacts.read_jsonl(partial, drop_torn_tail=True) if storage.exists(partial) else []

    def done_keys(self) -> set:
        return {r[self.key] for r in self.records}

    def extend(self, records) -> None:
        self.records.extend(records)

    def finish(self, order=None) -> list[dict]:
        if order is None:
            return self.records
        by_key = {r[self.key]: r for r in self.records}
        return [by_key[k] for k in order if k in by_key]


# ------------------------------------------------------------------ one shared work directory

def check_shared_workdir(workdir: str, lock: str, token: Optional[str]) -> None:
    """Raises the same UserError on every process unless each one finds
    process 0's `token` (the others pass None) in the `lock` file process 0
    holds. Every process reports what it found before any of them raises, so
    none is left waiting for another."""
    client = _client()
    if client is None:
        return
    expected = broadcast({"token": token, "workdir": workdir})
    try:
        with storage.open(lock) as f:
            seen = json.load(f).get("token")
    except (OSError, ValueError, AttributeError):
        seen = None
    key = f"{_PREFIX}workdir/{next(_calls)}/"
    client.key_value_set(f"{key}{index()}", "ok" if seen == expected["token"] else workdir)
    missing = {i: client.blocking_key_value_get(f"{key}{i}", _KV_TIMEOUT_MS) for i in range(count())}
    missing = {i: path for i, path in missing.items() if path != "ok"}
    if missing:
        which = ", ".join(f"{i} ({path})" for i, path in missing.items())
        raise UserError(f"process {which} of {count()} does not see the work directory {expected['workdir']} "
                        "that process 0 made and locked: every process must see one shared work directory "
                        "(a gs:// bucket or a shared file system)")


# ------------------------------------------------------------------ a lost or failed process

class _Watch(threading.Thread):
    """Beats (a counter under `beat/<index>`) every `interval` seconds and
    watches the others': a counter that has not moved for `timeout` seconds of
    this process's clock is a lost process; a `failed/<index>` key is a
    process that stopped on an error. Either ends this process with one line."""

    def __init__(self, timeout: float, interval: float):
        super().__init__(name="cai_jax-process-watch", daemon=True)
        self.timeout, self.interval = timeout, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        client, me, n = _client(), index(), count()
        last = {i: (None, time.monotonic()) for i in range(n) if i != me}
        unreachable_since = None
        for beat in itertools.count():
            if self.stopped.wait(0 if beat == 0 else self.interval) or _client() is None:
                return  # stopped, or jax.distributed shut down
            try:
                client.key_value_set(f"{_PREFIX}beat/{me}", str(beat), allow_overwrite=True)
                beats = dict(client.key_value_dir_get(f"{_PREFIX}beat/"))
                failed = client.key_value_dir_get(f"{_PREFIX}failed/")
                unreachable_since = None
            except Exception as e:  # the coordination service (process 0) is gone
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > min(self.timeout, 10 * self.interval):
                    _stop(f"error: lost process 0 of {n} (the coordinator does not answer: "
                          f"{str(e).splitlines()[0][:120]}); the run stops here. Relaunch every process with "
                          "the same command to resume", EXIT_PROCESS_LOST, lost=0)
                continue
            if self.stopped.is_set():
                return
            for key, value in failed:
                other = int(key.rsplit("/", 1)[1])
                if other != me:
                    failure = json.loads(value)
                    _stop(f"error: process {other} of {n} stopped: {failure['line']}", failure["code"])
            now = time.monotonic()
            for other, (value, since) in last.items():
                seen = beats.get(f"{_PREFIX}beat/{other}")
                if seen != value:
                    last[other] = (seen, now)
                elif now - since > self.timeout:
                    _stop(f"error: lost process {other} of {n} (no heartbeat for {now - since:.0f} s: its host "
                          "died or hangs); the run stops here. Relaunch every process with the same command "
                          "to resume", EXIT_PROCESS_LOST, lost=other)


def _stop(line: str, code: int, lost: Optional[int] = None) -> None:
    """Ends this process at once with one line (an orderly exit would wait for
    the `lost` process in JAX's shutdown barrier), after telling the others why."""
    try:
        sys.stdout.flush()
        _publish_failure(line[len("error: "):] if line.startswith("error: ") else line, code)
        _leave()
        _wait_for_the_others(lost)
    finally:
        print(line, file=sys.stderr, flush=True)
        os._exit(code)


def watch(timeout_seconds: float, interval_seconds: float = 1.0) -> None:
    """Starts the watch over the other processes (no-op with one process)."""
    global _watch
    if _client() is None or count() == 1 or _watch is not None:
        return
    _watch = _Watch(timeout_seconds, interval_seconds)
    _watch.start()


def run_and_report(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(...); in a multi-process run, a process that fails (an exception or
    a non-zero exit) first tells the others, so that they stop with its line
    and exit status instead of waiting for it, then exits at once (JAX's
    shutdown would wait for them). A process that succeeds stops its watch
    before JAX's shutdown, where the others may leave in any order."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:
        if _watch is None or (isinstance(e, SystemExit) and not e.code):
            raise
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        if _is_runtime_error(e):
            # A collective whose peer died fails here (gloo: "connection closed by
            # peer") or hangs: either way the watch names the lost process, and
            # ends this one, within its timeout.
            time.sleep(_watch.timeout + 3 * _watch.interval)
        if not isinstance(e, SystemExit):
            import traceback
            traceback.print_exc()
        _watch.stopped.set()
        _report_failure(e, code)
        _leave()
        _wait_for_the_others()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    finally:
        if _watch is not None:
            _watch.stopped.set()
    return result


def _is_runtime_error(error: BaseException) -> bool:
    """An error of XLA's runtime (a failed collective among them)."""
    import jax
    return isinstance(error, jax.errors.JaxRuntimeError)


def _leave() -> None:
    try:
        _client().key_value_set(f"{_PREFIX}left/{index()}", "1")
    except Exception:
        pass  # the coordinator is gone: nobody waits


def _wait_for_the_others(lost: Optional[int] = None, seconds: float = 10.0) -> None:
    """Process 0 hosts the coordination service: when it stops, it waits a
    little for the others (but a `lost` one) to read why and leave, since each
    of them aborts with a stack trace the moment the service goes away."""
    if index() != 0:
        return
    others = {i for i in range(1, count()) if i != lost}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            left = {int(key.rsplit("/", 1)[1]) for key, _ in _client().key_value_dir_get(f"{_PREFIX}left/")}
            if others <= left:
                return
        except Exception:
            return
        time.sleep(0.1)


def _report_failure(error: BaseException, code: int) -> None:
    # A UserError's own line: exit_on_user_error printed it and raised SystemExit while handling it.
    cause = error.__context__ if isinstance(error, SystemExit) and error.__context__ is not None else error
    line = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if not isinstance(cause, (UserError, SystemExit)):
        line = f"{type(cause).__name__}: {line}"
    _publish_failure(line, code)


def _publish_failure(line: str, code: int) -> None:
    """Tells the others' watch that this process stops, why and with which status."""
    try:
        _client().key_value_set(f"{_PREFIX}failed/{index()}", json.dumps({"line": line, "code": code}))
    except Exception:
        pass  # the coordinator is gone too: the others' watch finds this process lost
