"""cai_jax/huge_pages.py: the entry points' re-run with glibc's huge-page tunable."""
import json
import os
import subprocess
import sys

import pytest

from cai_jax import huge_pages

# A child that re-runs itself as main.py does, then reports what the re-run
# process has: its arguments, the tunable, and whether a large touched block
# really sits on transparent huge pages.
_CHILD = r"""
import json, sys
from cai_jax.huge_pages import rerun_with_huge_pages
rerun_with_huge_pages()
import ctypes, os
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20  # through glibc's malloc, as XLA's buffers are (numpy would madvise by itself)
block = libc.malloc(size)
ctypes.memset(block, 1, size)
with open("/proc/self/smaps_rollup") as f:
    huge_kb = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "huge_kb": huge_kb, "last_byte": ctypes.c_ubyte.from_address(block + size - 1).value}))
"""


def _run_child(tmp_path, **env):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    full_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.ENV_SWITCH)}
    full_env.update(env)
    out = subprocess.run([sys.executable, str(script), "first arg", "--flag=2"], env=full_env,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tunable_is_added_to_what_is_set():
    assert huge_pages.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert (huge_pages.tunables_with_huge_pages("glibc.malloc.arena_max=2")
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


def test_switch_and_existing_tunable_stop_the_rerun(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "0")
    assert not huge_pages.rerun_needed()
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's own choice wins
    assert not huge_pages.rerun_needed()
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="CAI_JAX_HUGE_PAGES"):
        huge_pages.rerun_needed()


def test_rerun_needs_glibc_and_madvise_mode(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(huge_pages.ENV_SWITCH, raising=False)
    monkeypatch.setattr(huge_pages, "_glibc_version", lambda: (2, 36))
    for mode, wanted in (("madvise", True), ("always", False), ("never", False), (None, False)):
        monkeypatch.setattr(huge_pages, "_thp_mode", lambda mode=mode: mode)
        assert huge_pages.rerun_needed() is wanted, mode
    monkeypatch.setattr(huge_pages, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(huge_pages, "_glibc_version", lambda: (2, 34))
    assert not huge_pages.rerun_needed()
    monkeypatch.setattr(huge_pages, "_glibc_version", lambda: None)
    assert not huge_pages.rerun_needed()


def test_thp_mode_reads_the_bracketed_word(tmp_path, monkeypatch):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_MODE_FILE", str(mode_file))
    assert huge_pages._thp_mode() == "madvise"
    monkeypatch.setattr(huge_pages, "THP_MODE_FILE", str(tmp_path / "missing"))
    assert huge_pages._thp_mode() is None


def test_rerun_keeps_arguments_and_gets_huge_pages(tmp_path):
    if not huge_pages.rerun_needed():
        pytest.skip("this machine would not re-run (no glibc >= 2.35, THP not in madvise mode, or switched off)")
    child = _run_child(tmp_path)
    assert child["argv"] == ["first arg", "--flag=2"]
    assert child["tunables"] == "glibc.malloc.hugetlb=1"
    assert child["huge_kb"] >= 2048, child  # at least one 2 MB page under the 256 MB block
    assert child["last_byte"] == 1


def test_switched_off_runs_without_the_tunable(tmp_path):
    child = _run_child(tmp_path, **{huge_pages.ENV_SWITCH: "0"})
    assert child["argv"] == ["first arg", "--flag=2"]
    assert child["tunables"] == ""
    if huge_pages._thp_mode() == "madvise":
        assert child["huge_kb"] == 0, child  # so the test above measures the tunable, not the kernel
