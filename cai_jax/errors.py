"""User errors: mistakes in what the user gave (config, command line, data files).

A `UserError`'s message is one line that names the key, file or line at fault,
the bad value and what is allowed. The command-line tools print it as
`error: <message>` on stderr and exit with status 2; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user; the message alone says what to fix."""


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient or update. Raised before
    anything from that step is saved, so the last good checkpoint stays the
    latest; the usual cause is a setting (learning rate), hence a user error."""


def exit_on_user_error(fn: Callable[..., T], *args, debug: bool = False) -> T:
    """fn(*args), with a UserError turned into one line on stderr and exit status 2
    (re-raised with its traceback when `debug`)."""
    try:
        return fn(*args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
