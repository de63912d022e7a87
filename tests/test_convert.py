"""The convert CLI: round trips between our directory format and HF."""
import subprocess
import sys

import jax
import numpy as np

from cai_jax.weights.loader import load_model


def _convert(src, dst):
    out = subprocess.run([sys.executable, "-m", "cai_jax.tools.convert", f"--src={src}", f"--dst={dst}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_ckpt_hf_round_trip_preserves_weights(tmp_path):
    original = load_model("init:tiny-gpt2", to_device=False)
    from cai_jax.weights import model_dir
    model_dir.save_model_dir(str(tmp_path / "a"), original.config, original.params, original.tokenizer)
    assert "wrote hf:" in _convert(f"ckpt:{tmp_path / 'a'}", f"hf:{tmp_path / 'h'}")
    _convert(f"hf:{tmp_path / 'h'}", f"ckpt:{tmp_path / 'b'}")
    back = load_model(f"ckpt:{tmp_path / 'b'}", to_device=False)
    assert back.config.replace(max_seq_len=original.config.max_seq_len) == original.config
    for a, b in zip(jax.tree.leaves(original.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.tokenizer is not None and back.tokenizer.eos_token_id == original.tokenizer.eos_token_id


def test_bad_destination_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cai_jax.tools.convert", "--src=init:tiny",
                          f"--dst=onnx:{tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "expected hf:DIR or ckpt:DIR" in out.stderr
