"""Meshes, partition rules, and sharded == single-device train steps (8 CPU devices)."""
import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from cai_jax import sharding as shd


def test_mesh_shape_resolves_minus_one():
    assert shd.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert shd.mesh_shape({"data": 1, "fsdp": -1}, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="does not divide"):
        shd.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        shd.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        shd.mesh_shape({"model": 2}, 8)


def test_spec_replicates_undivisible_dims_and_uses_each_axis_once():
    class FakeMesh:  # spec_for only reads .shape
        shape = {"data": 2, "fsdp": 2, "tensor": 2}
    rules = shd.DEFAULT_RULES
    # SmolLM2's k kernel: [layers, embed=576, kv_heads=3, head_dim=64]; 3 kv heads cannot split over 2.
    assert shd.spec_for((30, 576, 3, 64), ("layers", "embed", "kv_heads", "head_dim"), FakeMesh, rules) == \
        P(None, "fsdp", None, None)
    assert shd.spec_for((64, 128), ("embed", "mlp"), FakeMesh, rules) == P("fsdp", "tensor")
    # batch maps to (data, fsdp); a later embed dim must not reuse fsdp.
    assert shd.spec_for((8, 64), ("batch", "embed"), FakeMesh, rules) == P(("data", "fsdp"), None)


def test_sharded_train_steps_match_single_device():
    script = os.path.join(os.path.dirname(__file__), "scripts", "sharded_train_steps.py")
    out = subprocess.run([sys.executable, script, "8x1x1", "2x2x2", "1x4x2"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"1x1x1", "8x1x1", "2x2x2", "1x4x2"}
    for shape, r in report.items():
        assert r["loss_diff"] <= 1e-5, (shape, r)
        assert r["param_diff"] <= 1e-5, (shape, r)
    # The meshes really shard the weights: fsdp on embed, tensor on mlp.
    assert report["1x4x2"]["mlp_gate_up_spec"] == "P(None, 'fsdp', None, 'tensor')"


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "checkpoint_reshard.py")
    out = subprocess.run([sys.executable, script, str(tmp_path / "ckpt")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"1x4x2", "8x1x1", "1x1x1"}
    for shape, r in report.items():
        assert r == {"equal": True, "on_target_sharding": True, "rng_equal": True,
                     "extra": {"data": {"pos": 3}}}, shape
