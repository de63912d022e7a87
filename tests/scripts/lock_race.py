"""Processes racing to take over one stale work-directory lock, for
tests/test_pipeline.py: in each trial a lock of a dead pid is left in a fresh
directory and PROCS forked processes call `pipeline.workdir_lock` on it at the
same moment. A holder records itself in `holders/` while it holds the lock and
notes whether another was there; a holder that finds the lock held stops with
the usual "in use" error. Prints one JSON line: trials with two holders at once,
unexpected errors (anything but "in use"), and trials nobody held. DIR may be
a gs:// URL (tests/test_gcs_workdir.py): every file goes through storage.py.

    python tests/scripts/lock_race.py DIR TRIALS PROCS
"""
import contextlib
import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

from cai_jax import pipeline, storage
from cai_jax.errors import UserError


def names(directory):
    """What a directory holds (on Cloud Storage an empty one does not exist)."""
    return storage.listdir(directory) if storage.exists(directory) else []


def contender(workdir, barrier, results):
    barrier.wait()
    holders = storage.join(workdir, "holders")
    try:
        with contextlib.redirect_stdout(io.StringIO()), pipeline.workdir_lock(workdir):
            others = names(holders)
            mine = storage.join(holders, str(os.getpid()))
            storage.write_atomic(mine, "")
            time.sleep(0.05)  # long next to the race's window, which is microseconds
            others += [p for p in names(holders) if p != str(os.getpid())]
            storage.remove(mine)
        results.put(("held", bool(others)))
    except UserError as e:
        results.put(("in use", "") if " is in use by pid " in str(e) else ("error", str(e)))
    except BaseException as e:  # noqa: BLE001 (reported, not raised: the test reads it)
        results.put(("error", f"{type(e).__name__}: {e}"))


def main(root, trials, procs):
    fork = multiprocessing.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps({"pid": dead.pid, "host": socket.gethostname()})
    two_holders, errors, unheld = 0, [], 0
    for trial in range(trials):
        workdir = storage.join(root, str(trial))
        storage.makedirs(storage.join(workdir, "holders"))
        storage.write_atomic(storage.join(workdir, pipeline.LOCK), stale)
        barrier, results = fork.Barrier(procs), fork.Queue()
        workers = [fork.Process(target=contender, args=(workdir, barrier, results)) for _ in range(procs)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join()
        two_holders += any(kind == "held" and overlap for kind, overlap in outcomes)
        unheld += not any(kind == "held" for kind, _ in outcomes)
        errors += [detail for kind, detail in outcomes if kind == "error"]
        leftovers = sorted(set(names(workdir)) - {"holders"})
        if leftovers:
            errors.append(f"trial {trial} left {leftovers}")
    print(json.dumps({"trials": trials, "two_holders": two_holders, "errors": errors, "unheld": unheld}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
