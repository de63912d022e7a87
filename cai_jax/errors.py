"""User errors: mistakes in what the user gave (config, command line, data files).

A `UserError`'s message is one line that names the key, file or line at fault,
the bad value and what is allowed. The command-line tools print it as
`error: <message>` on stderr and exit with status 2. A full disk is not a bug
either: it gets one line and status 2 as well. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
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


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient or update. Raised before
    anything from that step is saved, so the last good checkpoint stays the
    latest; the usual cause is a setting (learning rate), hence a user error."""


def disk_full(error: BaseException):
    """The OSError (or library error quoting one) in `error`'s chain that says
    the disk is full, or None. Checkpoint libraries re-raise ENOSPC as their
    own exception types with the OS message in the text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or \
                "No space left on device" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_line(error: BaseException) -> str:
    """One line for a full disk: what was being written, if known, and the space free now."""
    path = getattr(error, "filename", None)
    where = os.path.abspath(path) if path else os.getcwd()
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free / 2**30
    writing = f" writing {path}" if path else ""
    return (f"no space left on device{writing} ({free:.1f} GiB free now on the filesystem of {where}); "
            "free some space and rerun: finished stages are kept and the interrupted one resumes "
            "from its last checkpoint")


def exit_on_user_error(fn: Callable[..., T], *args, debug: bool = False) -> T:
    """fn(*args), with a UserError or a full disk turned into one line on stderr
    and exit status 2 (re-raised with its traceback when `debug`)."""
    try:
        return fn(*args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:
        full = disk_full(e)
        if full is None or debug:
            raise
        print(f"error: {disk_full_line(full)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
