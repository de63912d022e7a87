"""User errors: mistakes in what the user gave (config, command line, data files).

A `UserError`'s message is one line that names the key, file or line at fault,
the bad value and what is allowed. The command-line tools print it as
`error: <message>` on stderr and exit with status 2. A full disk (no space, the
quota, a file size limit) is not a bug either: it gets one line and status 2 as
well, naming the work directory's filesystem when a run was writing there, and
nothing else on stderr (the tracebacks libraries' threads print for the failed
write are dropped; `--debug` keeps them). Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user; the message alone says what to fix."""


class BadSwitchError(UserError, ValueError):
    """An on/off environment variable (CAI_JAX_*_CACHE, CAI_JAX_HUGE_PAGES) with
    a value that is neither; still a ValueError, like MalformedFileError."""


class MalformedFileError(UserError, ValueError):
    """A file the user can read and fix (an artifact, a data file) has a bad
    line; the message names the file and the line. Still a ValueError, so
    code that handles bad values handles it too."""


def json_error_text(error, whole_file: bool = False) -> str:
    """All of a json.JSONDecodeError's message, where it is: the column of a
    JSONL line (its own "line 1" would mislead), or the line and column of a
    whole file. Its bare `msg` can end mid-sentence ("Unterminated string
    starting at")."""
    message = error.msg[:-len(" at")] if error.msg.endswith(" at") else error.msg
    where = f"line {error.lineno} column {error.colno}" if whole_file else f"column {error.colno}"
    return f"{message} at {where}"


class NotModelledError(UserError, ValueError):
    """Model weights whose config asks for something our model does not compute
    (a RoPE scaling or sliding-window attention we lack): the message names the
    file and the feature. Loading them would run and give wrong answers."""


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient or update. Raised before
    anything from that step is saved, so the last good checkpoint stays the
    latest; the usual cause is a setting (learning rate), hence a user error."""


# A write the filesystem refused for want of room: the OS's own words, which
# libraries that re-raise it as their own exception type keep in their text.
_FULL = {errno.ENOSPC: ("No space left on device", "no space left on device"),
         errno.EDQUOT: ("Disk quota exceeded", "disk quota exceeded"),
         errno.EFBIG: ("File too large", "file too large: over the file size limit (`ulimit -f`) or the "
                                         "filesystem's largest file")}


def _full_errno(error: BaseException):
    if isinstance(error, OSError) and error.errno in _FULL:
        return error.errno
    text = str(error)
    return next((number for number, (words, _) in _FULL.items() if words in text), None)


def disk_full(error: BaseException):
    """The OSError (or library error quoting one) in `error`'s chain that says
    the disk is full (no space, the quota, a file size limit), or None.
    Checkpoint libraries re-raise ENOSPC as their own exception types with the
    OS message in the text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError) or _full_errno(error) is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


class DiskFullError(UserError):
    """A write failed for want of room while a run wrote to its work directory;
    the message names that directory's filesystem (full_disk_in)."""


def _existing_dir(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def _same_filesystem(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def disk_full_line(error: BaseException, workdir: str | None = None) -> str:
    """One line for a full disk: what was being written, if known, and the space
    free now on the filesystem it went to: that of the path the error names
    (OSError.filename, else a path quoted in a library's message), reported as
    the work directory when it lies there; without a path, the work directory's,
    else the current directory's."""
    if isinstance(error, DiskFullError):
        return str(error)
    path = getattr(error, "filename", None)
    named = path or next((p for p in re.findall(r'"(/[^"]+)"', str(error))), None)
    where = _existing_dir(named) if named else None
    if workdir is not None and os.path.isdir(workdir):
        workdir = os.path.abspath(workdir)
        inside = where is not None and os.path.realpath(where).startswith(os.path.realpath(workdir) + os.sep)
        if where is None or where == workdir or (inside and _same_filesystem(where, workdir)):
            where = workdir
    where = where or os.getcwd()
    number = _full_errno(error) or errno.ENOSPC
    free = shutil.disk_usage(where).free
    free = f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
    writing = f" writing {path}" if path else ""
    remedy = "raise the limit" if number == errno.EFBIG else "free some space"
    return (f"{_FULL[number][1]}{writing} ({free} free now on the filesystem of {where}); "
            f"{remedy} and rerun: finished stages are kept and the interrupted one resumes "
            "from its last checkpoint")


@contextlib.contextmanager
def full_disk_in(workdir: str):
    """A full disk inside the block (a stage's checkpoint, a model, a record)
    becomes a DiskFullError whose one line names the work directory's
    filesystem and its free space: a library's error may name no file, and the
    current directory may be anywhere."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        raise DiskFullError(disk_full_line(full, workdir)) from e


class _HeldBack:
    """Keeps the tracebacks that a failed write prints on its way up off stderr
    until the run's end: orbax's worker threads log theirs (absl, with the
    traceback), tensorstore prints those of its callbacks onto the event loop
    orbax closed when the write failed (sys.excepthook), coroutines left behind
    are reported at exit (sys.unraisablehook). When the run ends on a full disk,
    its one line says all there is to say: they are dropped, with whatever the
    interpreter's shutdown reports after it. Otherwise they are printed at the
    end. Anything else passes straight through."""

    def __init__(self):
        self.held: list[Callable[[], None]] = []
        self.dropping = False  # after the one line: everything else is noise
        self.replaying = False
        self.filters: list[tuple[logging.Handler, _HeldRecords]] = []
        self.hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)

    def holds(self, error) -> bool:
        """Whether to keep back the report of `error`: a failed write's (or,
        after the one line, any)."""
        if self.replaying or error is None:
            return False
        return self.dropping or disk_full(error) is not None or (
            isinstance(error, RuntimeError) and str(error) == "Event loop is closed")

    def hold(self, replay: Callable[[], None]) -> None:
        if not self.dropping:
            self.held.append(replay)

    def _hook(self, original, error, *args) -> None:
        if self.holds(error):
            self.hold(lambda: original(*args))
        else:
            original(*args)

    def __enter__(self):
        excepthook, thread_hook, unraisable_hook = self.hooks
        sys.excepthook = lambda *a: self._hook(excepthook, a[1], *a)
        threading.excepthook = lambda a: self._hook(thread_hook, a.exc_value, a)
        sys.unraisablehook = lambda a: self._hook(unraisable_hook, a.exc_value, a)
        for handler in logging.getLogger().handlers:
            self.filters.append((handler, _HeldRecords(self, handler)))
            handler.addFilter(self.filters[-1][1])
        return self

    def drop_the_rest(self) -> None:
        self.dropping, self.held = True, []

    def __exit__(self, *exc) -> None:
        sys.excepthook, threading.excepthook, sys.unraisablehook = self.hooks
        for handler, records in self.filters:
            handler.removeFilter(records)
        if self.dropping:
            # The interpreter's shutdown reports more of the same (the failed
            # write's coroutines, collected unfinished): drop what it reports.
            sys.excepthook = _unless_finalizing(sys.excepthook)
            sys.unraisablehook = _unless_finalizing(sys.unraisablehook)
            return
        self.replaying = True
        for replay in self.held:
            replay()


def _unless_finalizing(hook, is_finalizing=sys.is_finalizing):
    """`hook`, ignored once the interpreter is shutting down (the closure needs
    no module globals, which shutdown clears)."""
    def quiet(*args):
        if not is_finalizing():
            hook(*args)
    return quiet


class _HeldRecords(logging.Filter):
    """_HeldBack's filter on one logging handler: holds a record whose traceback it holds."""

    def __init__(self, held: _HeldBack, handler: logging.Handler):
        super().__init__()
        self.held, self.handler = held, handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.held.holds(record.exc_info[1] if record.exc_info else None):
            return True
        self.held.hold(lambda: self.handler.handle(record))
        return False


def exit_on_user_error(fn: Callable[..., T], *args, debug: bool = False) -> T:
    """fn(*args), with a UserError or a full disk turned into one line on stderr
    and exit status 2 (re-raised with its traceback when `debug`). Without
    `debug`, a full disk prints that line alone: the tracebacks that libraries'
    threads print for the failed write are dropped (_HeldBack)."""
    with contextlib.nullcontext() if debug else _HeldBack() as held:
        try:
            return fn(*args)
        except UserError as e:
            if debug:
                raise
            if held is not None and disk_full(e) is not None:
                held.drop_the_rest()
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except Exception as e:
            full = disk_full(e)
            if full is None or debug:
                raise
            held.drop_the_rest()
            print(f"error: {disk_full_line(full)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
