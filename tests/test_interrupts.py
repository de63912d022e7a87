"""Ctrl-C and SIGTERM (cai_jax/interrupts.py), in small programs run the way
cai_jax.main runs: one line on stderr and status 130 or 143 however the signal
lands, and never status 0 after one. The pipeline's handling (the lock, the
stage named, the resume) is in test_faults.py."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LINE = "interrupted before the first stage; rerun the same command to resume"


def _start(body: str) -> subprocess.Popen:
    """`body` (defining run()) under interrupts.install() and interrupts.call(run)."""
    program = "import asyncio, gc, os, signal, sys, time\nfrom cai_jax import interrupts\n" \
              "interrupts.install()\n" + textwrap.dedent(body) + "\ninterrupts.call(run)\n"
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc


def _signal_when(proc, word: str, *signums) -> tuple[int, list[str], list[str], float]:
    """Sends the signals once `proc` prints `word`; (status, stdout lines,
    stderr lines, seconds from the first signal to the exit)."""
    assert proc.stdout.readline().strip() == word
    sent = time.time()
    for signum in signums:
        proc.send_signal(signum)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out.splitlines(), err.strip().splitlines(), time.time() - sent


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_with_one_line_and_its_status(signum, status):
    proc = _start("""
        def run():
            print("ready", flush=True)
            time.sleep(30)
            print("not stopped", flush=True)
    """)
    code, out, err, seconds = _signal_when(proc, "ready", signum)
    assert (code, out, err) == (status, [], [LINE]) and seconds < 10


def test_a_signal_dropped_in_a_gc_callback_still_stops_the_run():
    # Raised in a garbage-collection callback (JAX runs one on every
    # collection), a KeyboardInterrupt was printed as "Exception ignored in"
    # and dropped: the run went on and exited 0.
    proc = _start("""
        def callback(phase, info):
            if phase == "start" and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))  # bytecode in the callback: the handler runs here

        fired = []
        def run():
            print("ready", flush=True)
            gc.callbacks.append(callback)
            gc.collect()
            for _ in range(100):
                time.sleep(0.01)
            print("carried on", flush=True)
    """)
    code, out, err, _ = _signal_when(proc, "ready")
    assert (code, out, err) == (130, [], [LINE])


def test_the_status_is_never_0_after_a_signal():
    proc = _start("""
        def run():
            try:
                print("ready", flush=True)
                time.sleep(30)
            except BaseException:  # code that swallows everything
                pass
            print("returned", flush=True)
    """)
    code, out, err, _ = _signal_when(proc, "ready", signal.SIGINT)
    assert (code, out, err) == (130, ["returned"], [LINE])


def test_a_deferred_block_finishes_first_and_a_second_signal_exits_at_once():
    body = """
        def run():
            with interrupts.deferred():
                print("ready", flush=True)
                time.sleep(1.5)
                print("block done", flush=True)
            time.sleep(30)
            print("not stopped", flush=True)
    """
    code, out, err, seconds = _signal_when(_start(body), "ready", signal.SIGINT)
    assert (code, out, err) == (130, ["block done"], [LINE]) and seconds < 10
    code, out, err, seconds = _signal_when(_start(body), "ready", signal.SIGINT, signal.SIGINT)
    assert (code, out) == (130, []) and seconds < 1.4
    assert err == ["interrupted again before the first stage; stopped at once; rerun the same command to resume"]


def test_a_running_event_loop_is_not_torn_down():
    # Orbax reads and writes checkpoints in an asyncio loop; raised inside it,
    # the interrupt closed the loop under pending callbacks, which printed
    # tracebacks ("Event loop is closed").
    proc = _start("""
        async def work():
            print("ready", flush=True)
            await asyncio.sleep(1.0)
            print("loop done", flush=True)

        def run():
            asyncio.new_event_loop().run_until_complete(work())
            time.sleep(30)
    """)
    code, out, err, _ = _signal_when(proc, "ready", signal.SIGINT)
    assert (code, out, err) == (130, ["loop done"], [LINE])


def test_a_signal_before_the_run_starts_exits_at_once():
    program = "import time\nfrom cai_jax import interrupts\ninterrupts.install()\n" \
              "print('ready', flush=True)\ntime.sleep(30)\n"  # the imports, before call()
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    code, out, err, _ = _signal_when(proc, "ready", signal.SIGTERM)
    assert (code, out, err) == (143, [], [LINE])
