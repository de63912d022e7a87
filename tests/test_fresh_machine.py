"""The main entry point as a new user's machine runs it: no torch, empty caches.

The README's main install (`pip install -e ".[qwen-05b]"`) brings no torch; the test extra
does. A warm tokenizer cache once hid that the pipeline imported torch on the
main path, so this test blocks `import torch` and points every cache at a new
empty folder.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# `sys.modules["torch"] = None` makes `import torch` raise ImportError, as on a
# machine without torch, while `importlib.util.find_spec("torch")` reports it
# absent (transformers' own check) instead of raising.
_RUN_WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; "
    "sys.argv = ['cai_jax.main'] + sys.argv[1:]; "
    "runpy.run_module('cai_jax.main', run_name='__main__')")


# Slow (74 s): CI's main command runs the real thing on every submission, in a
# new virtualenv without torch and with empty caches (.ci/run).
@pytest.mark.slow
def test_tiny_pipeline_runs_without_torch_and_with_empty_caches(tmp_path):
    env = dict(os.environ, CAI_JAX_CACHE=str(tmp_path / "cache"),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PLATFORMS="cpu")
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT_TORCH, "--config=configs/tiny.py", f"--workdir={workdir}",
         "--noprogress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (workdir / "report.md").exists()
    assert "| eval | done" in out.stdout
    # The tokenizer was built from the GGUF's metadata, into the empty cache.
    assert os.listdir(tmp_path / "cache" / "tokenizers")
    # Resume state goes once its stage is complete; the value model only at the last step.
    assert not [p for p in workdir.rglob("*") if p.name == "ckpt" or p.name.endswith(".checksums.json")]
    assert (workdir / "models/rl_cai/step_2/value").is_dir()
    assert not (workdir / "models/rl_cai/step_1/value").exists()
