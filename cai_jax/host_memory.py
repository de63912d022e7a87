"""Giving memory back to the operating system between pieces of work.

A run loads several large models one after another in one process (the
0.5B policy is 2 GB of float32, its Adam moments 4 GB more). Freed arrays
often stay in the process: glibc keeps freed blocks in its heaps, and XLA's
compiled programs keep theirs. Measured on the default run (2-core AMD EPYC,
24 GB): the process held 2.3 GB after the pm_train stage with no live array
left, 0.5 GB after `malloc_trim`; without it PPO was killed for memory at its
first checkpoint, at the edge of the machine's 24 GB.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> bool:
    """Returns the free memory of glibc's heaps to the OS; False where there is
    no glibc (then nothing is done)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def release(clear_compiled: bool = True) -> None:
    """Frees what finished work left: arrays kept only by reference cycles,
    JAX's compiled programs (when `clear_compiled`; the disk cache keeps them)
    and glibc's free blocks."""
    gc.collect()
    if clear_compiled and "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()
    trim()
