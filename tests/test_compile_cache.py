"""The persistent compilation cache the entry points switch on: where it goes,
the off switch, and a folder that cannot be written (a warning, not a crash).

JAX's cache settings are process-wide, so each case runs in a new process."""
import json
import os
import subprocess
import sys

import pytest

from cai_jax import compile_cache

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Switches the cache on as an entry point does, compiles one program and reports.
_CHILD = r"""
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from cai_jax.compile_cache import enable_compilation_cache
    chosen = enable_compilation_cache()
    import jax, jax.numpy as jnp
    value = float(jax.jit(lambda x: jnp.sin(x) * 3.0 + x @ x.T)(jnp.ones((4, 4))).sum())
print(json.dumps({"chosen": chosen, "value": value,
                  "enabled": jax.config.jax_enable_compilation_cache,
                  "warnings": [str(w.message) for w in caught]}))
"""


def _run(tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "CAI_JAX_"))}
    env.update({"JAX_PLATFORMS": "cpu", "CAI_JAX_CACHE": str(tmp_path / "cache"), **env_vars})
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _files(directory):
    return [f for f in os.listdir(directory) if not f.startswith(".")] if os.path.isdir(directory) else []


def test_on_by_default_under_the_project_cache_folder(tmp_path):
    got = _run(tmp_path)
    folder = str(tmp_path / "cache" / "jax_cache")
    assert got["chosen"] == folder and got["enabled"] and not got["warnings"]
    assert _files(folder)  # the program was written, though it compiled in well under a second
    assert got["value"] == pytest.approx(16 * (3 * 0.8414709848 + 4))


def test_jax_own_folder_setting_wins(tmp_path):
    folder = str(tmp_path / "elsewhere")
    got = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=folder)
    assert got["chosen"] == folder and _files(folder)
    assert not os.path.exists(tmp_path / "cache" / "jax_cache")


@pytest.mark.parametrize("value", ["0", "off"])
def test_the_off_switch(tmp_path, value):
    # Off even when JAX's own variable would have switched the cache on.
    folder = str(tmp_path / "elsewhere")
    got = _run(tmp_path, CAI_JAX_COMPILATION_CACHE=value, JAX_COMPILATION_CACHE_DIR=folder)
    assert got["chosen"] is None and not got["enabled"] and not got["warnings"]
    assert not _files(folder) and not os.path.exists(tmp_path / "cache")


def test_an_unwritable_folder_is_a_warning_and_the_program_still_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder below a file cannot be made, even by root
    got = _run(tmp_path, CAI_JAX_CACHE=str(blocker / "cache"))
    assert got["chosen"] is None and not got["enabled"]
    assert got["value"] == pytest.approx(16 * (3 * 0.8414709848 + 4))
    assert len(got["warnings"]) == 1 and "compilation cache off: cannot write to" in got["warnings"][0]


def test_chosen_dir_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("CAI_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv(compile_cache.ENV_SWITCH, "1")
    assert compile_cache.chosen_dir() == os.path.join(str(tmp_path), "jax_cache")
    monkeypatch.setenv(compile_cache.ENV_SWITCH, "nope")
    with pytest.raises(ValueError, match=r"\$CAI_JAX_COMPILATION_CACHE is 'nope'; use 0"):
        compile_cache.chosen_dir()
