"""Ahead-of-time TPU compiles on this CPU machine (cai_jax.tools.aot, cai_jax.aot_steps).

Compiling for a TPU topology needs libtpu (the `tpu` extra); those tests skip
without it. The FLOP formulas are checked against XLA's own count on CPU.
"""
import os
import subprocess
import sys
import types

import jax
import pytest

from cai_jax import aot_steps, sharding as shd, tpu_specs
from cai_jax.config import model_section
from cai_jax.models.config import model_config_from_dict
from cai_jax.tools import aot

GIB = 2 ** 30
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason=f"libtpu is not installed; ahead-of-time TPU compiles need it: {aot.INSTALL_HINT}")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _tiny(**fields):
    section = model_section("tiny")
    for key, value in fields.items():
        section[key] = value
    return section


def _workload(**changes):
    return dict(aot_steps.get_default_config().to_dict(), **changes)


# ------------------------------------------------------------- no libtpu needed

def test_slice_names_count_tensorcores_for_v5p():
    assert tpu_specs.slice_name("v5p:4x4x4") == "v5p-128"
    assert tpu_specs.slice_name("v5p:2x4x4") == "v5p-64"
    assert tpu_specs.slice_name("v5p:2x2x1") == "v5p-8"
    assert tpu_specs.slice_name("v5e:4x4") == "v5litepod-16"
    assert tpu_specs.num_chips("v5p:4x4x8") == 128
    with pytest.raises(ValueError, match="GENERATION:AxBxC"):
        tpu_specs.parse_topology("v5p-128")


def test_mesh_flag_parsing():
    assert aot.parse_mesh("fsdp=16,tensor=4") == {"data": 1, "fsdp": 16, "tensor": 4}
    with pytest.raises(aot.AotConfigError, match="AXIS=SIZE"):
        aot.parse_mesh("model=4")


def test_matmul_weights_by_hand():
    cfg = model_config_from_dict({"name": "tiny", "vocab_size": 512})
    # d=64, 4 query heads and 2 KV heads of 16, SwiGLU width 128, 2 layers, tied head.
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128
    assert aot_steps.matmul_weights(cfg) == 2 * per_layer + 64 * 512
    # Forward: 2 FLOPs per weight per token, plus QK^T and PV over all 32 keys.
    rows, seq = 3, 32
    attention = 2 * (2 * 2 * seq * 4 * 16)
    assert aot_steps.forward_flops(cfg, rows, seq) == rows * seq * (2 * (2 * per_layer + 64 * 512) + attention)


@pytest.mark.parametrize("kind", ["sft", "pm"])
def test_analytic_flops_match_xla_on_an_unrolled_model(kind):
    # XLA counts a scan body once, so unroll the layers; on CPU the count is exact
    # for matmuls and adds a few percent of elementwise work.
    cfg = model_config_from_dict({"name": "tiny", "vocab_size": 512, "scan_layers": False})
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    phases = aot_steps.build_phases(kind, cfg, mesh, _workload(batch_size=4, seq_len=64,
                                                               micro_batch_per_shard=0))
    phase = phases.phases[0]
    flops = phase.fn.lower(*phase.args).compile().cost_analysis()["flops"]
    assert 1.0 <= flops / phase.model_flops < 1.12


def test_grad_accumulation_from_rows_per_shard():
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})  # only the shape matters
    assert aot_steps.grad_accum_for(64, mesh, 4) == 4      # 16 rows per shard, 4 at a time
    assert aot_steps.grad_accum_for(64, mesh, 0) == 1
    assert aot_steps.grad_accum_for(24, mesh, 4) == 1      # 6 rows per shard: 6 is not 4 * k
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        aot_steps.grad_accum_for(66, mesh, 4)


def test_parse_oom_messages():
    # As libtpu 0.0.42 words them (the first one seen compiling 52B SFT on 8 chips).
    temps = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (148.42G) exceeds available HBM (95.74G).")
    assert aot.parse_oom(temps) == ("temporaries", pytest.approx(148.42 * GIB), pytest.approx(95.74 * GIB))
    used = "Ran out of memory in memory space hbm. Used 143.27G of 95.74G hbm. Exceeded by 47.53G."
    assert aot.parse_oom(used) == ("used", pytest.approx(143.27 * GIB), pytest.approx(95.74 * GIB))
    assert aot.parse_oom("INTERNAL: something else") is None


# ------------------------------------------------------------- TPU topology compiles

@pytest.fixture(scope="module")
def v5p8():
    return aot.topology_devices("v5p:2x2x1")


def _independent_train_state_bytes(cfg, chips):
    # Every tiny/paper parameter has an `embed` axis, sharded over fsdp = all chips:
    # parameters, Adam mu and nu in float32, each split evenly.
    return 3 * cfg.num_params() * 4 / chips


@needs_libtpu
def test_tiny_sft_compiles_for_v5p_and_reports_memory(v5p8):
    report = aot.run_aot(_tiny(), "v5p:2x2x1", "sft", {"fsdp": 4}, _workload(batch_size=8, seq_len=128),
                         devices=v5p8)
    assert report.fits and report.chips == 4 and report.slice_name == "v5p-8"
    phase = report.phases[0]
    cfg = model_config_from_dict(_tiny())
    state = _independent_train_state_bytes(cfg, 4)
    batch = 3 * 8 * 128 * 4 / 4  # tokens, attention_mask, loss_mask: int32, batch over 4 chips
    # The compiler's argument bytes: train state + batch, plus the padding of small
    # arrays to whole TPU memory tiles (a few KiB each; 5% of this tiny model).
    assert state + batch <= phase.argument_bytes < 1.08 * (state + batch)
    assert abs(report.resident_bytes["train_state"] - state) < 1024
    assert phase.alias_bytes >= state  # the donated state is updated in place
    assert phase.temp_bytes > 0
    assert report.model_flops == aot_steps.train_flops(cfg, 8, 128)[0]
    assert report.step_seconds_at_peak == pytest.approx(report.model_flops / (4 * 459e12))
    text = report.format()
    assert "v5p-8" in text and "fits" in text


@needs_libtpu
def test_tiny_pm_and_ppo_compile(v5p8):
    pm = aot.run_aot(_tiny(), "v5p:2x2x1", "pm", {"fsdp": 2, "tensor": 2},
                     _workload(batch_size=8, seq_len=64), devices=v5p8)
    assert pm.fits and [p.name for p in pm.phases] == ["pm_update"]
    ppo = aot.run_aot(_tiny(), "v5p:2x2x1", "ppo", {"fsdp": 4},
                      _workload(batch_size=8, seq_len=64, answer_len=16), devices=v5p8)
    assert [p.name for p in ppo.phases] == ["policy_update", "value_update", "rollout_scores", "pm_score"]
    cfg = model_config_from_dict(_tiny())
    value_params = model_config_from_dict(_tiny(heads=("scalar",))).num_params()
    # Frozen reference (LM head) and preference model (scalar head) in bfloat16.
    assert ppo.resident_bytes["reference"] == pytest.approx(cfg.num_params() * 2 / 4, abs=64)
    assert ppo.resident_bytes["preference_model"] == pytest.approx(value_params * 2 / 4, abs=64)
    assert ppo.resident_bytes["policy_params"] + ppo.resident_bytes["policy_opt_state"] == pytest.approx(
        _independent_train_state_bytes(cfg, 4), abs=1024)
    policy, value, scoring, pm_score = ppo.phases
    # While the policy updates, everything but its own state and the batch stays resident.
    held = ppo.resident_bytes
    assert policy.other_resident_bytes == (held["value_params"] + held["value_opt_state"]
                                           + held["reference"] + held["preference_model"])
    assert ppo.peak_bytes == max(p.total_bytes for p in ppo.phases)


@needs_libtpu
def test_smollm2_sft_compiles_for_v5p(v5p8):
    section = model_section("smollm2-135m")
    section.dtype, section.remat = "bfloat16", "full"
    report = aot.run_aot(section, "v5p:2x2x1", "sft", {"fsdp": 4}, _workload(batch_size=8, seq_len=256),
                         devices=v5p8)
    cfg = model_config_from_dict(section)
    assert report.fits
    assert report.resident_bytes["train_state"] == pytest.approx(3 * cfg.num_params(), rel=0.01)


@needs_libtpu
def test_over_large_config_does_not_fit_with_the_numbers(v5p8):
    section = model_section("52b")
    with pytest.raises(aot.DoesNotFit) as info:
        aot.run_aot(section, "v5p:2x2x1", "sft", {"fsdp": 4}, _workload(), devices=v5p8)
    needed = _independent_train_state_bytes(model_config_from_dict(section), 4) / GIB
    assert f"does not fit: needs {needed:.1f} GiB per chip, v5p has 95 GiB" in str(info.value)


@needs_libtpu
def test_activations_that_do_not_fit_are_reported_from_the_compiler(v5p8):
    # Tiny weights, but float32 logits of 2048 rows x 1024 tokens x 49152 vocab per step.
    with pytest.raises(aot.DoesNotFit, match=r"does not fit: needs \d+\.\d GiB per chip, v5p has 95 GiB"):
        aot.run_aot(_tiny(max_seq_len=1024), "v5p:2x2x1", "sft", {"fsdp": 4},
                    _workload(batch_size=2048, seq_len=1024, micro_batch_per_shard=0), devices=v5p8)


@needs_libtpu
def test_mesh_that_does_not_divide_is_a_clear_error(v5p8):
    with pytest.raises(aot.AotConfigError, match="does not divide 4 devices"):
        aot.run_aot(_tiny(), "v5p:2x2x1", "sft", {"fsdp": 3}, _workload(), devices=v5p8)
    with pytest.raises(aot.AotConfigError, match="batch_size 6 is not divisible by the 4 batch shards"):
        aot.run_aot(_tiny(), "v5p:2x2x1", "sft", {"fsdp": 4}, _workload(batch_size=6), devices=v5p8)


@needs_libtpu
def test_command_line_reports_does_not_fit_without_a_traceback():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "cai_jax.tools.aot", "--config=configs/base.py",
         "--config.model.name=52b", "--topology=v5p:2x2x1", "--step=ppo", "--mesh=fsdp=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit: needs" in proc.stderr and "v5p has 95 GiB" in proc.stderr
    assert "Traceback" not in proc.stderr
