"""Ctrl-C (SIGINT) and SIGTERM: the run stops with one line and exit status
128 + the signal's number (130, 143), never a traceback and never status 0.

`install()` replaces Python's handlers (KeyboardInterrupt for SIGINT, instant
death for SIGTERM). The first signal records itself and raises `Interrupted`
where the program is, like KeyboardInterrupt but a different class, so that
`except KeyboardInterrupt` code does not take it for a user's. The work
directory stays consistent as after a kill: stages write to staging and swap in
atomically (pipeline.py), and `deferred()` blocks (taking and releasing the
lock, the swap-in) get it when they end. A second signal exits at once.

An exception raised in a garbage-collection callback, `__del__` or weakref
callback is printed as "Exception ignored in ..." and dropped, and JAX runs one
on every collection (`_xla_gc_callback`): a plain KeyboardInterrupt landing
there was lost and the run went on to exit 0. Here such a dropped `Interrupted`
is delivered again (sys.unraisablehook), the recorded signal is checked at the
safe points the pipeline marks with `during()` (each stage's start and end),
and `call()`, around the whole run, turns any ending after a signal into the
one line and status 128 + signal.
"""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: Optional[int] = None  # the first signal's number
_where = "before the first stage"  # what the line says the run was doing
_deferring = 0  # depth of deferred() blocks
_redelivering = False  # the next handler call is a dropped Interrupted delivered again
_closing = False  # call() has finished: a signal now exits at once
_started = False  # call() has started; before, nothing is written and a signal exits at once


class Interrupted(BaseException):
    """The run was asked to stop by a signal. A BaseException, like
    KeyboardInterrupt: `except Exception` cleanup lets it through."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def received() -> Optional[int]:
    """The number of the signal that asked the run to stop, or None."""
    return _received


def _line() -> str:
    return f"interrupted {_where}; rerun the same command to resume"


def _exit_now(signum: int, again: bool) -> None:
    """Exits at once, without cleaning up (a lock left behind is taken over by the next run)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    line = f"interrupted again {_where}; stopped at once; rerun the same command to resume" if again else _line()
    os.write(2, (line + "\n").encode())
    os._exit(128 + signum)


def _handler(signum: int, frame) -> None:
    global _received, _redelivering
    if _redelivering:
        _redelivering = False
        if _closing:
            return  # call() is already exiting with the line
    elif _received is not None or _closing or not _started:
        _exit_now(signum, again=_received is not None)
    else:
        _received = signum
    if _deferring:
        return
    if (frame is not None and frame.f_code is _unraisable.__code__) or _event_loop_running():
        # Raised in the hook it would be dropped too; raised in an event loop
        # (orbax reads and writes checkpoints in one) it tears the loop down
        # under its pending callbacks, which print tracebacks: a moment later.
        _thread.start_new_thread(_redeliver, (_received, 0.05))
        return
    raise Interrupted(_received)


def _event_loop_running() -> bool:
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and asyncio.events._get_running_loop() is not None


_previous_unraisablehook = sys.unraisablehook


def _unraisable(args) -> None:
    """An Interrupted dropped in a gc callback, __del__ or weakref callback is
    delivered again, from another thread a moment later, when this hook has
    returned: the handler raises it anew in the main thread's code (and again,
    should that be in such a callback too)."""
    if isinstance(args.exc_value, Interrupted):
        _thread.start_new_thread(_redeliver, (args.exc_value.signum, 0.001))  # does not wait for it
        return
    _previous_unraisablehook(args)


def _redeliver(signum: int, delay: float) -> None:
    global _redelivering
    time.sleep(delay)
    _redelivering = True
    _thread.interrupt_main(signum)


def install() -> None:
    """Handles SIGINT and SIGTERM as above; call it first thing in an entry
    point, then run the program in call(). Until then (imports) a signal exits
    at once with the line."""
    global _previous_unraisablehook
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    if sys.unraisablehook is not _unraisable:
        _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _unraisable


def check() -> None:
    """A safe point: raises Interrupted if a signal came (one that was dropped,
    or that arrived in a deferred block)."""
    if _received is not None and not _deferring:
        raise Interrupted(_received)


@contextlib.contextmanager
def deferred():
    """A block a signal does not cut short: it is recorded, and raised when the
    block ends (unless it ends by an exception)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    check()


@contextlib.contextmanager
def during(what: str):
    """A part of the run, named in the line (`during stage ppo`); its start and
    end are safe points."""
    global _where
    check()
    _where = f"during {what}"
    yield
    _where = f"after {what}"
    check()


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(...), then, if a signal came meanwhile, however fn ended (returned,
    raised, or printed an error and exited): the one line on stderr and exit
    status 128 + signal."""
    global _closing, _started, _received
    _started = True
    try:
        result = fn(*args, **kwargs)
    except KeyboardInterrupt:  # SIGINT while some library had put Python's handler back
        _received = _received or int(signal.SIGINT)
    except BaseException:
        if _received is None:
            raise
    _closing = True
    if _received is not None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(_line(), file=sys.stderr, flush=True)
        sys.exit(128 + _received)
    return result
