"""Ahead-of-time TPU compiles on this CPU machine (cai_jax.tools.aot, cai_jax.tools.aot_steps).

Compiling for a TPU topology needs libtpu (the `tpu` extra); those tests skip
without it. The FLOP formulas are checked against XLA's own count on CPU, and
the programs against the run's config (PPO's dtypes and shared trunk).
"""
import os
import subprocess
import sys
import types

import jax
import pytest

from cai_jax import sharding as shd
from cai_jax.tools import aot_phase, aot_steps, tpu_specs
from cai_jax.config import load_config_module, model_section
from cai_jax.models.config import model_config_from_dict
from cai_jax.tools import aot

GIB = 2 ** 30
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason=f"libtpu is not installed; ahead-of-time TPU compiles need it: {aot.INSTALL_HINT}")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


experiment_config = load_config_module(os.path.join(REPO, "configs", "base.py")).experiment_config


def _tiny(**fields):
    section = model_section("tiny")
    for key, value in fields.items():
        section[key] = value
    return section


def _config(model=None, **sections):
    """A run's config: the given model section (tiny) and stage sections
    updated with the given fields, e.g. sl_train={"batch_size": 8}."""
    config = experiment_config()
    config.model = model if model is not None else _tiny()
    for name, fields in sections.items():
        config[name].update(fields)
    return config


def _sft(batch_size, seq_len, **fields):
    return {"sl_train": dict(batch_size=batch_size, max_seq_len=seq_len, grad_accum_steps=1, **fields)}


def _ppo(rows, prompt, answer, **fields):
    return {"ppo": dict(rollout_batch_size=rows, minibatch_size=rows, max_prompt_tokens=prompt,
                        max_new_tokens=answer, grad_accum_steps=1, **fields)}


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
    assert aot_phase.matmul_weights(cfg) == 2 * per_layer + 64 * 512
    # Forward: 2 FLOPs per weight per token, plus QK^T and PV over all 32 keys.
    rows, seq = 3, 32
    attention = 2 * (2 * 2 * seq * 4 * 16)
    assert aot_phase.forward_flops(cfg, rows, seq) == rows * seq * (2 * (2 * per_layer + 64 * 512) + attention)


@pytest.mark.parametrize("kind", ["sft", "pm"])
def test_analytic_flops_match_xla_on_an_unrolled_model(kind):
    # XLA counts a scan body once, so unroll the layers; on CPU the count is exact
    # for matmuls and adds a few percent of elementwise work.
    model = _tiny(vocab_size=512, scan_layers=False)
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    sections = _sft(4, 64) if kind == "sft" else {"pm_train": dict(batch_size=4, max_seq_len=64)}
    phases = aot_steps.build_phases(kind, _config(model, **sections), mesh)
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


def _abstract_dtypes(tree):
    return {str(leaf.dtype) for leaf in jax.tree.leaves(tree)}


def test_ppo_program_follows_the_configs_dtypes_and_shared_trunk():
    # The programs come from config.ppo as the stage builds them (ppo.build_programs),
    # not from a workload of the tool's own.
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    separate = aot_steps.build_phases("ppo", _config(**_ppo(4, 16, 8)), mesh)
    shared = aot_steps.build_phases("ppo", _config(**_ppo(4, 16, 8, share_trunk=True, dtype="bfloat16",
                                                          ref_dtype="bfloat16", pm_dtype="bfloat16")), mesh)
    # On one device the sampler runs its feature-major trunk, which AOT leaves out (a note says so).
    assert [p.name for p in separate.phases] == ["policy_update", "value_update", "rollout_scores", "pm_score"]
    assert [p.name for p in shared.phases] == ["policy_update", "rollout_scores", "pm_score"]
    assert shared.generation is None and "generation is not compiled on one device" in shared.notes[0]
    # ppo.ref_dtype defaults to float32: the reference is stored (and computes) as configured.
    assert _abstract_dtypes(separate.resident["reference"]) == {"float32"}
    assert _abstract_dtypes(shared.resident["reference"]) == {"bfloat16"}
    assert _abstract_dtypes(shared.resident["preference_model"]) == {"bfloat16"}
    ref_arg = {p.name: p for p in shared.phases}["rollout_scores"].args[1]
    assert _abstract_dtypes(ref_arg) == {"bfloat16"}
    # One trunk with both heads, trained by one step; no value model anywhere.
    assert "scalar_head" in shared.resident["policy_params"] and "value_params" not in shared.resident
    assert shared.model_config.heads == ("lm", "scalar") and shared.model_config.dtype == "bfloat16"
    assert separate.model_config.heads == ("lm",) and separate.model_config.dtype == "float32"
    assert shared.workload["share_trunk"] and shared.workload["ref_dtype"] == "bfloat16"
    # Rows and lengths come from the section: minibatch of 4 rows of 16 + 8 tokens.
    update_batch = {p.name: p for p in separate.phases}["policy_update"].args[1]
    assert update_batch["tokens"].shape == (4, 24) and update_batch["advantages"].shape == (4, 8)
    # The compiled programs differ accordingly: the reference's forward pass in
    # bfloat16, half the argument bytes for its weights.
    scorer = {p.name: p for p in shared.phases}["rollout_scores"]
    assert "bf16" in scorer.fn.lower(*scorer.args).as_text()
    ref_bytes = [aot_phase.bytes_per_chip(p.resident["reference"]) for p in (separate, shared)]
    assert ref_bytes[1] == ref_bytes[0] // 2


def test_section_defaults_and_micro_batches_per_shard():
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    config = experiment_config()
    config.model = _tiny()
    del config["ppo"]  # like configs/base.py: the stage's defaults
    phases = aot_steps.build_phases("ppo", config, mesh, micro_batch_per_shard=2)
    defaults = aot_steps.stage_section(config, "ppo")
    assert phases.workload["rollout_batch_size"] == defaults.rollout_batch_size
    assert phases.grad_accum_steps == defaults.minibatch_size // 2


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
    report = aot.run_aot(_config(**_sft(8, 128)), "v5p:2x2x1", "sft", {"fsdp": 4}, devices=v5p8,
                         micro_batch_per_shard=4)
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
    assert report.model_flops == aot_phase.train_flops(cfg, 8, 128)[0]
    assert report.step_seconds_at_peak == pytest.approx(report.model_flops / (4 * 459e12))
    text = report.format()
    assert "v5p-8" in text and "fits" in text


@needs_libtpu
def test_tiny_pm_and_ppo_compile(v5p8):
    pm = aot.run_aot(_config(pm_train=dict(batch_size=8, max_seq_len=64)), "v5p:2x2x1", "pm",
                     {"fsdp": 2, "tensor": 2}, devices=v5p8)
    assert pm.fits and [p.name for p in pm.phases] == ["pm_update"]
    ppo = aot.run_aot(_config(**_ppo(8, 48, 16, ref_dtype="bfloat16", pm_dtype="bfloat16"),
                              pm_train=dict(max_seq_len=64)),
                      "v5p:2x2x1", "ppo", {"fsdp": 4}, devices=v5p8)
    assert [p.name for p in ppo.phases] == ["policy_update", "value_update", "prefill", "decode",
                                            "rollout_scores", "pm_score"]
    cfg = model_config_from_dict(_tiny())
    value_params = model_config_from_dict(_tiny(heads=("scalar",))).num_params()
    # Frozen reference (LM head) and preference model (scalar head) in bfloat16.
    assert ppo.resident_bytes["reference"] == pytest.approx(cfg.num_params() * 2 / 4, abs=64)
    assert ppo.resident_bytes["preference_model"] == pytest.approx(value_params * 2 / 4, abs=64)
    assert ppo.resident_bytes["policy_params"] + ppo.resident_bytes["policy_opt_state"] == pytest.approx(
        _independent_train_state_bytes(cfg, 4), abs=1024)
    policy, value, prefill, decode, scoring, pm_score = ppo.phases
    # While the policy updates, everything but its own state and the batch stays resident.
    held = ppo.resident_bytes
    assert policy.other_resident_bytes == (held["value_params"] + held["value_opt_state"]
                                           + held["reference"] + held["preference_model"])
    # The sampler decodes on its own (unrolled) copy of the policy's weights,
    # with all four models and both optimizer states resident beside it.
    assert decode.other_resident_bytes == sum(held.values())
    assert decode.argument_bytes >= ppo.generation.weight_bytes + ppo.generation.cache_bytes
    assert ppo.peak_bytes == max(p.total_bytes for p in ppo.phases)
    # One iteration: the rollout's generation, its scoring, epochs x minibatches of updates.
    t, chips_peak = ppo.iteration_seconds, 4 * 459e12
    assert t["score"] == pytest.approx((scoring.model_flops + pm_score.model_flops) / chips_peak)
    assert t["update"] == pytest.approx(4 * (policy.model_flops + value.model_flops) / chips_peak)
    assert t["total"] == pytest.approx(ppo.generation.seconds + t["score"] + t["update"])
    assert "one PPO iteration at these bounds" in ppo.format()
    # Another config, another program: one trunk, the reference in float32 (ppo.ref_dtype's default).
    shared = aot.run_aot(_config(**_ppo(8, 48, 16, share_trunk=True), pm_train=dict(max_seq_len=64)),
                         "v5p:2x2x1", "ppo", {"fsdp": 4}, devices=v5p8)
    assert [p.name for p in shared.phases] == ["policy_update", "prefill", "decode", "rollout_scores",
                                               "pm_score"]
    assert "value_params" not in shared.resident_bytes
    assert shared.resident_bytes["reference"] == pytest.approx(2 * held["reference"], abs=128)
    scorer = shared.phases[3]
    assert scorer.argument_bytes >= shared.resident_bytes["reference"] + shared.resident_bytes["policy_params"]


@needs_libtpu
def test_smollm2_sft_compiles_for_v5p(v5p8):
    section = model_section("smollm2-135m")
    section.dtype, section.remat = "bfloat16", "full"
    report = aot.run_aot(_config(section, **_sft(8, 256)), "v5p:2x2x1", "sft", {"fsdp": 4},
                         devices=v5p8)
    cfg = model_config_from_dict(section)
    assert report.fits
    assert report.resident_bytes["train_state"] == pytest.approx(3 * cfg.num_params(), rel=0.01)


@needs_libtpu
def test_over_large_config_does_not_fit_with_the_numbers(v5p8):
    section = model_section("52b")
    with pytest.raises(aot.DoesNotFit) as info:
        aot.run_aot(_config(section), "v5p:2x2x1", "sft", {"fsdp": 4}, devices=v5p8)
    needed = _independent_train_state_bytes(model_config_from_dict(section), 4) / GIB
    assert f"does not fit: needs {needed:.1f} GiB per chip, v5p has 95 GiB" in str(info.value)


@needs_libtpu
def test_activations_that_do_not_fit_are_reported_from_the_compiler(v5p8):
    # Tiny weights, but float32 logits of 2048 rows x 1024 tokens x 49152 vocab per step.
    with pytest.raises(aot.DoesNotFit, match=r"does not fit: needs \d+\.\d GiB per chip, v5p has 95 GiB"):
        aot.run_aot(_config(_tiny(max_seq_len=1024), **_sft(2048, 1024)), "v5p:2x2x1", "sft",
                    {"fsdp": 4}, devices=v5p8)


@needs_libtpu
def test_mesh_that_does_not_divide_is_a_clear_error(v5p8):
    with pytest.raises(aot.AotConfigError, match="does not divide 4 devices"):
        aot.run_aot(_config(), "v5p:2x2x1", "sft", {"fsdp": 3}, devices=v5p8)
    with pytest.raises(aot.AotConfigError, match="sl_train.batch_size 6 is not divisible by the 4 batch shards"):
        aot.run_aot(_config(**_sft(6, 64)), "v5p:2x2x1", "sft", {"fsdp": 4}, devices=v5p8)
    with pytest.raises(aot.AotConfigError, match="rollout_batch_size \\(6\\) must be a multiple of the 4"):
        aot.run_aot(_config(**_ppo(6, 16, 8)), "v5p:2x2x1", "ppo", {"fsdp": 4}, devices=v5p8)


@needs_libtpu
def test_command_line_reports_does_not_fit_without_a_traceback():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "cai_jax.tools.aot", "--config=configs/default.py",
         "--config.model.name=52b", "--config.ppo.ref_dtype=bfloat16", "--topology=v5p:2x2x1",
         "--step=ppo", "--mesh=fsdp=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit: needs" in proc.stderr and "v5p has 95 GiB" in proc.stderr
    assert "Traceback" not in proc.stderr
