"""Transparent huge pages for XLA's buffers: `cai_jax.main` (and
benchmarks/bench_train.py) re-run themselves once with glibc's
`glibc.malloc.hugetlb=1` tunable.

Why: every train step allocates its temporaries afresh (several GB for the
preference-model step) and glibc hands large blocks straight back to the
kernel, so each step first-touches them again, 4 KB page by 4 KB page: about
1.7 million page faults and 3 s of system time per PM step (Intel dev machine).
With the tunable, glibc asks for transparent huge pages (2 MB) on the memory it
maps; on an AMD EPYC machine, in one `benchmarks/bench_train.py --quick` run
each way, the PM step went from 17.2 to 14.7 s and the SFT step from 24.1 to
23.2 s, torch's unchanged, and the default run from 1,315 to 1,249 s
(docs/huge-pages.md). `cai_jax.tools.generate` does not re-run: decoding
got slower with it (18.0 against 16.9 s for 32 x 128 tokens).

glibc reads its tunables only when a process starts, hence the re-run: it
happens before jax is imported, costs a fresh interpreter (tens of ms) and keeps
the process id, arguments and open files. It is skipped where it cannot help:
not Linux/glibc, glibc older than 2.35 (no such tunable), transparent huge pages
not in "madvise" mode (with "always" every large block gets them anyway, with
"never" none do), a GLIBC_TUNABLES that already says `glibc.malloc.hugetlb`,
or `CAI_JAX_HUGE_PAGES=0`.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from cai_jax.weights.cache import switched_on

ENV_SWITCH = "CAI_JAX_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> Optional[tuple]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # not glibc, or no such confstr
        return None
    if name != "glibc":
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _thp_mode() -> Optional[str]:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never")."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def tunables_with_huge_pages(current: str) -> str:
    """GLIBC_TUNABLES with the huge-page tunable added to what is set already."""
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def rerun_needed() -> bool:
    """Whether this process should re-run itself to get huge pages."""
    if not switched_on(ENV_SWITCH) or TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    version = _glibc_version()
    return version is not None and version >= (2, 35) and _thp_mode() == "madvise"


def rerun_with_huge_pages() -> None:
    """Replaces this process by the same command with the tunable set, when
    `rerun_needed()`. Call it first thing in an entry point's `__main__`, before
    jax is imported. Returns only when no re-run is wanted or exec failed."""
    if not rerun_needed():
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", "")))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # run on without huge pages rather than not at all
