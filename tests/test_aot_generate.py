"""Ahead-of-time compiles of generation, and of models known only by an HF config.json
(cai_jax.tools.aot_generate, cai_jax.tools.aot_model).

The memory and decode-bandwidth figures are checked against the arrays' own
sizes worked out by hand; the TPU compiles need libtpu (the `tpu` extra) and
skip without it.
"""
import json
import os
import subprocess
import sys

import jax
import pytest

from cai_jax import sharding as shd
from cai_jax.config import load_config_module, model_section
from cai_jax.models.config import RopeScaling, hf_features_not_modelled, model_config_from_dict
from cai_jax.tools import aot, aot_generate, aot_model, aot_steps

GIB = 2 ** 30
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf_configs")
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason=f"ahead-of-time TPU compiles need libtpu: {aot.INSTALL_HINT}")
experiment_config = load_config_module(os.path.join(REPO, "configs", "base.py")).experiment_config


def _config(model, **sections):
    config = experiment_config()
    config.model = model
    for name, fields in sections.items():
        config[name].update(fields)
    return config


def _hf_section(directory, **fields):
    section = model_section("tiny", source=f"hf:{directory}")
    for key, value in fields.items():
        section[key] = value
    return section


def _small_qwen2_config_json(directory, max_position_embeddings: int) -> None:
    """A Qwen2-shaped model (q/k/v biases, untied head) small enough to compile in seconds."""
    (directory / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": max_position_embeddings, "rope_theta": 1e6, "tie_word_embeddings": False}))


def _rollout(rows, prompt, answer, **fields):
    section = dict(rollout_batch_size=rows, minibatch_size=rows, sample_batch_size=rows,
                   max_prompt_tokens=prompt, max_new_tokens=answer)
    return {"ppo": dict(section, **fields)}


# ------------------------------------------------------------- HF config.json alone

@pytest.mark.parametrize("name, published", [("qwen2.5-7b-instruct", 7_615_616_512),
                                             ("llama-3.1-8b-instruct", 8_030_261_248)])
def test_hf_config_alone_gives_the_published_parameter_count(name, published):
    cfg, label, notes = aot_model.model_for_aot(_hf_section(os.path.join(FIXTURES, name), dtype="bfloat16"))
    assert label == name and cfg.dtype == "bfloat16" and not cfg.tie_embeddings
    d, f, h, kv, hd, layers, vocab = (cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads,
                                      cfg.head_dim, cfg.num_layers, cfg.vocab_size)
    attention = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if cfg.qkv_bias else 0)
    by_hand = 2 * vocab * d + layers * (attention + 3 * d * f + 2 * d) + d  # untied head, final norm
    assert cfg.num_params() == by_hand == published
    if name.startswith("qwen"):
        assert (layers, d, f, h, kv, vocab) == (28, 3584, 18944, 28, 4, 152064)
        assert cfg.qkv_bias and cfg.rope_theta == 1e6 and notes == []
    else:
        assert (layers, d, f, h, kv, vocab) == (32, 4096, 14336, 32, 8, 128256)
        assert not cfg.qkv_bias and cfg.rope_theta == 500000.0 and notes == []
        assert cfg.rope_scaling == RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192)


def test_hf_config_features_we_do_not_model_are_notes_for_aot(tmp_path):
    """Shapes alone still compile (a note says what the weights would need);
    loading real weights with such a config refuses (test_model_parity)."""
    published = os.path.join(FIXTURES, "llama-3.1-8b-instruct", "config.json")
    with open(published) as f:
        hf = json.load(f)
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg, _, notes = aot_model.model_for_aot(_hf_section(tmp_path))
    assert cfg.rope_scaling is None and cfg.num_params() == 8_030_261_248
    assert notes == ["rope_scaling 'yarn' (factor 4.0) is not modelled (only linear, llama3): "
                     "the rotary frequencies would be wrong"]
    qwen = {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 2,
            "num_hidden_layers": 4, "max_position_embeddings": 32768}
    assert hf_features_not_modelled(qwen) == [
        "sliding-window attention (window 4096) is not modelled: every layer would attend to the whole context"]
    assert hf_features_not_modelled(dict(qwen, max_window_layers=4)) == []  # no layer at or past 4 slides
    assert hf_features_not_modelled(dict(qwen, use_sliding_window=False)) == []
    assert hf_features_not_modelled({"model_type": "mistral", "max_position_embeddings": 32768}) != []  # 4096
    assert hf_features_not_modelled({"model_type": "mistral", "sliding_window": None}) == []
    assert hf_features_not_modelled({"model_type": "mistral", "sliding_window": 4096,
                                     "max_position_embeddings": 4096}) == []  # never reached


def test_hf_dir_without_a_usable_config_is_a_one_line_error(tmp_path):
    def error(directory, **fields):
        with pytest.raises(aot_model.NoUsableModelConfig) as info:
            aot_model.model_for_aot(_hf_section(directory, **fields))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "no such directory" in error(tmp_path / "missing")
    assert "holds neither weights nor a config.json" in error(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "holds 1 weight files but a config.json" in error(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert "is not readable JSON" in error(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert "not a usable model config" in error(tmp_path) and "mamba" in error(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "not a usable model config (KeyError" in error(tmp_path)
    assert "cannot override" in error(os.path.join(FIXTURES, "qwen2.5-7b-instruct"), num_layers=2)


# ------------------------------------------------------------- workloads and HLO

def test_each_generating_section_gives_its_workload():
    cfg = model_config_from_dict({"name": "tiny"})
    config = _config(model_section("tiny"), **_rollout(64, 96, 24, temperature=0.7, sample_batch_size=16))
    ppo = aot_generate.workload_for(config, "ppo", cfg)
    assert (ppo.rows, ppo.batch_size, ppo.prompt_tokens, ppo.answer_tokens) == (64, 16, 96, 24)
    assert ppo.mode == aot_generate.sampling.Mode(greedy=False, top_k=False, top_p=False)
    config.sl_generate.update(batch_size=8, critique_max_new_tokens=100)
    sl = aot_generate.workload_for(config, "sl_generate", cfg)
    # The longest of its three lengths; prompts up to what the context leaves.
    assert (sl.rows, sl.answer_tokens, sl.prompt_tokens) == (8, 128, 512 - 128)
    assert sl.mode.top_p  # config.sampling's top_p 0.95
    config.pairs.update(batch_size=4, max_new_tokens=32, temperature=0.0)
    pairs = aot_generate.workload_for(config, "pairs", cfg)
    assert (pairs.rows, pairs.prompt_tokens, pairs.answer_tokens) == (4, 480, 32) and pairs.mode.greedy
    with pytest.raises(ValueError, match="do not fit the model's context of 512"):
        aot_generate.workload_for(config, "pairs", cfg, prompt_tokens=500)


def test_loop_collectives_are_read_from_the_compiled_text():
    hlo = "\n".join([
        '  %ag = bf16[4,1024]{1,0} all-gather(%p), metadata={op_name="jit(_decode)/while/body/layers_0"}',
        '  %cp = (bf16[2,8]{1,0}, bf16[2,8]{1,0}, u32[], u32[]) collective-permute-start(%x), '
        'metadata={op_name="jit(_decode)/while/body/attn"}',
        '  %ar = f32[100]{0} all-reduce(%y), metadata={op_name="jit(_decode)/while/body/logits"}',
        '  %outside = f32[1000]{0} all-reduce(%z), metadata={op_name="jit(_decode)/prefill"}',
        '  %done = bf16[2,8]{1,0} collective-permute-done(%cp), metadata={op_name="jit(_decode)/while/body/attn"}',
    ])
    assert aot_generate.loop_collective_bytes(hlo) == 4 * 1024 * 2 + 2 * 8 * 2 + 100 * 4


# ------------------------------------------------------------- TPU topology compiles

@pytest.fixture(scope="module")
def v5p8():
    return aot.topology_devices("v5p:2x2x1")


@needs_libtpu
def test_tiny_generate_memory_and_decode_bytes_by_hand(v5p8):
    # bfloat16 compute over float32 weights, 8 rows of 48 + 16 slots on fsdp=4.
    model = model_section("tiny")
    config = _config(model, **_rollout(8, 48, 16, dtype="bfloat16"))
    report = aot.run_aot(config, "v5p:2x2x1", "generate", {"fsdp": 4}, devices=v5p8, shared_prefix=True)
    assert report.fits
    assert [p.name for p in report.phases] == ["prefill", "decode", "prefill_shared", "decode_shared"]
    cfg = model_config_from_dict(model)
    g = report.generation
    assert (g.batch_rows, g.prompt_width, g.gen_width, g.batches) == (8, 48, 16, 1)
    # Weights: the sampler's unrolled copy of every float32 parameter, each split
    # over the 4 chips on its embed axis. The cache: keys and values of 2 layers x
    # 8 rows x 2 KV heads x 16 dims x 64 slots in bfloat16, rows split over 4 chips.
    weights = cfg.num_params() * 4 // 4
    cache = 2 * 2 * 8 * 2 * 16 * 64 * 2 // 4
    assert (g.weight_bytes, g.cache_bytes) == (weights, cache) and g.copies_weights
    decode = report.phases[1]
    assert decode.alias_bytes >= cache  # the donated cache is updated in place
    # The compiler's arguments: weights, cache and the few per-row arrays (tile-padded).
    assert weights + cache <= decode.argument_bytes < weights + cache + 256 * 2 ** 10
    # A decode step reads every weight in bfloat16 (the tied embedding as the
    # LM head) and the whole cache.
    assert g.decode_step_bytes == cfg.num_params() * 2 // 4 + cache
    assert g.decode_step_bounds["hbm"] == pytest.approx(g.decode_step_bytes / 2765e9)
    assert g.decode_step_collective_bytes is not None
    assert g.seconds == pytest.approx(g.prefill_seconds + 15 * g.decode_step_seconds)
    assert g.tokens_per_second == pytest.approx(8 * 16 / g.seconds)
    text = report.format()
    assert "decode step bound" in text and "prefill" in text and "answer tokens/s" in text
    # The shared-prefix layout at its largest: prefix and suffix slots each as
    # wide as the longest prompt, so its cache holds 48 + 48 + 16 slots.
    shared_cache = 2 * 2 * 8 * 2 * 16 * (48 + 48 + 16) * 2 // 4
    decode_shared = report.phases[3]
    assert decode_shared.alias_bytes >= shared_cache
    # (The chips pad the slot axis to 128 lanes, which hides 64 against 112
    # slots in the byte counts: the compiled shapes themselves.)
    phases = aot_steps.build_phases("generate", config, shd.make_mesh({"fsdp": 4}, v5p8), shared_prefix=True)
    slots = {p.name: jax.tree.leaves(p.args[2]["cache"])[0].shape[-1] for p in phases.phases
             if p.name.startswith("decode")}
    assert slots == {"decode": 48 + 16, "decode_shared": 48 + 48 + 16}
    assert weights + shared_cache <= decode_shared.argument_bytes < weights + shared_cache + 256 * 2 ** 10
    whole_only = aot_steps.build_phases("generate", config, shd.make_mesh({"fsdp": 4}, v5p8))
    assert [p.name for p in whole_only.phases] == ["prefill", "decode"]


@needs_libtpu
def test_smollm2_generate_compiles_for_v5p(v5p8):
    model = model_section("smollm2-135m")
    config = _config(model, **_rollout(4, 64, 16, dtype="bfloat16"))
    report = aot.run_aot(config, "v5p:2x2x1", "generate", {"fsdp": 4}, devices=v5p8)
    cfg = model_config_from_dict(model)
    # 30 layers x 3 KV heads x 64 dims x 80 slots, one row per chip.
    assert report.fits and report.generation.cache_bytes == 2 * 30 * 1 * 3 * 64 * 80 * 2
    assert report.resident_bytes["model_weights"] == pytest.approx(cfg.num_params() * 4 / 4, rel=0.01)


@needs_libtpu
def test_model_from_a_config_json_alone_compiles_sft_and_generate(tmp_path, v5p8):
    # A model known only by its config.json.
    _small_qwen2_config_json(tmp_path, max_position_embeddings=256)
    config = _config(_hf_section(tmp_path, dtype="bfloat16"), **_rollout(8, 32, 16),
                     sl_train=dict(batch_size=8, max_seq_len=64, grad_accum_steps=1))
    sft = aot.run_aot(config, "v5p:2x2x1", "sft", {"fsdp": 4}, devices=v5p8)
    generate = aot.run_aot(config, "v5p:2x2x1", "generate", {"fsdp": 4}, devices=v5p8)
    assert sft.fits and generate.fits and sft.model == generate.model == tmp_path.name
    cfg, _, _ = aot_model.model_for_aot(_hf_section(tmp_path))
    assert cfg.qkv_bias and sft.num_params == cfg.num_params()
    # The untied head is read from its [V, D] copy; the embedding only by lookup.
    g = generate.generation
    assert g.weight_bytes > g.decode_step_weight_bytes


@needs_libtpu
def test_command_line_names_a_missing_config_json_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cai_jax.tools.aot", "--config=configs/default.py",
         f"--config.model.source=hf:{tmp_path}", "--topology=v5p:2x2x1", "--step=generate",
         "--mesh=fsdp=4"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"hf:{tmp_path}: it holds neither weights nor a config.json" in proc.stderr


@needs_libtpu
def test_scoring_compiles_on_its_own(v5p8):
    config = _config(model_section("tiny"), **_rollout(8, 48, 16, ref_dtype="bfloat16"),
                     pm_train=dict(max_seq_len=64))
    report = aot.run_aot(config, "v5p:2x2x1", "score", {"fsdp": 4}, devices=v5p8)
    assert [p.name for p in report.phases] == ["rollout_scores", "pm_score"] and report.fits
    # Only the models the passes read stay resident: no optimizer state, no update batch.
    assert set(report.resident_bytes) == {"policy_params", "value_params", "reference", "preference_model"}
    assert report.tokens_per_step == 8 * 64


@needs_libtpu
def test_pod_config_compiles_for_a_small_topology(tmp_path, v5p8):
    # configs/pod.py (its dtypes, remat, mesh, PPO's models and epochs) with a
    # Qwen2-shaped model and batches small enough to compile here in seconds;
    # the full-size compiles are in experiments/results/pod_qwen2.5-7b-instruct.json.
    from cai_jax.config import load_config
    _small_qwen2_config_json(tmp_path, max_position_embeddings=32768)
    small = ["sl_train.batch_size=8", "sl_train.max_seq_len=128", "pm_train.max_seq_len=128",
             "ppo.rollout_batch_size=16", "ppo.sample_batch_size=16", "ppo.minibatch_size=8",
             "ppo.max_prompt_tokens=64", "ppo.max_new_tokens=32"]
    config = load_config(os.path.join(REPO, "configs", "pod.py"), [f"model.source=hf:{tmp_path}", *small])
    assert config.data.red_team.endswith("harmless-base/train.jsonl.gz")
    assert config.data.helpful.endswith("helpful-base/train.jsonl.gz")
    sft = aot.run_aot(config, "v5p:2x2x1", "sft", devices=v5p8)
    assert sft.fits and sft.mesh == {"data": 1, "fsdp": 1, "tensor": 4}
    assert (sft.dtype, sft.param_dtype, sft.remat) == ("bfloat16", "float32", "full")
    ppo = aot.run_aot(config, "v5p:2x2x1", "ppo", devices=v5p8)
    assert ppo.fits and "value_update" in [p.name for p in ppo.phases]
    assert ppo.workload["ref_dtype"] == ppo.workload["pm_dtype"] == "bfloat16"
    # 4 epochs of 2 minibatches per iteration, each updating policy and value.
    assert ppo.iteration_seconds["update"] == pytest.approx(
        8 * (ppo.phase_seconds("policy_update") + ppo.phase_seconds("value_update")))
