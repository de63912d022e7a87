"""The project's cache folder: `$CAI_JAX_CACHE`, default ~/.cache/cai_jax.

It holds what is expensive to rebuild and safe to delete: GGUF files assembled
from their PyPI parts.
"""
import os


def cache_dir() -> str:
    return os.environ.get("CAI_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cai_jax"))
