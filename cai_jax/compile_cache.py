"""XLA's persistent compilation cache, on by default for every entry point.

Compiled programs are kept under the project's cache folder
(`$CAI_JAX_CACHE/jax_cache`, default ~/.cache/cai_jax/jax_cache), so a second
run of a command, or a later stage compiling a program an earlier one already
compiled, loads it instead of compiling again. `CAI_JAX_COMPILATION_CACHE=0`
turns it off; JAX's own `JAX_COMPILATION_CACHE_DIR`, when set, picks the folder.
A folder that cannot be written is a warning and the run goes on uncached; a
write that fails later (disk full) is a warning from JAX itself.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Optional

from cai_jax.weights.cache import cache_dir, switched_on

ENV_SWITCH = "CAI_JAX_COMPILATION_CACHE"
# Cache every program, not only those over JAX's default 1 s of compile time: a
# run compiles dozens of sub-second programs, and together they are most of the
# start-up (docs/startup.md, "The compilation cache keeps every program").
MIN_COMPILE_SECS = 0.0


def _writable(directory: str) -> Optional[str]:
    """None when `directory` can be created and written to, else why not."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def chosen_dir() -> Optional[str]:
    """The folder the cache should use, or None when it is switched off."""
    if not switched_on(ENV_SWITCH):
        return None
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_dir(), "jax_cache")


def enable_compilation_cache() -> Optional[str]:
    """Points JAX's persistent cache at the project's folder; returns it, or None
    when the cache is off or its folder cannot be written (with a warning)."""
    import jax

    directory = chosen_dir()
    problem = None if directory is None else _writable(directory)
    if problem is not None:
        warnings.warn(f"compilation cache off: cannot write to {directory} ({problem}); set "
                      f"$CAI_JAX_CACHE to a writable folder, or {ENV_SWITCH}=0 to silence this",
                      RuntimeWarning, stacklevel=2)
    if directory is None or problem is not None:
        # Also when JAX_COMPILATION_CACHE_DIR had switched JAX's cache on by itself.
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's choice wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return directory
