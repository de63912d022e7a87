"""Our Flax decoder against transformers' torch implementations (independent code).

Random small weights go through our HF export; transformers loads them and must
produce the same logits (float32, max abs diff <= 1e-4).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import Transformer, init_params, positions_from_mask
from cai_jax.weights import hf, layout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, head_dim=16, mlp_dim=96,
             max_seq_len=64)
CONFIGS = {
    "llama_gqa_untied": TransformerConfig(arch="llama", num_kv_heads=2, rope_theta=5e4,
                                          tie_embeddings=False, **SMALL),
    "llama_tied": TransformerConfig(arch="llama", num_kv_heads=4, tie_embeddings=True, **SMALL),
    "qwen2_bias": TransformerConfig(arch="llama", num_kv_heads=2, qkv_bias=True, **SMALL),
    "gpt2": TransformerConfig(arch="gpt2", num_kv_heads=4, qkv_bias=True, out_bias=True,
                              mlp_bias=True, **SMALL),
}


def _randomize(params, seed):
    # Init leaves norms at 1 and biases at 0; random values exercise every term.
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [rng.normal(0, 0.2, x.shape).astype(np.float32) for x in leaves])


def _torch_logits(directory, tokens, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.asarray(positions_from_mask(jnp.asarray(mask)))))
    return out.logits.numpy()


def _our_logits(cfg, params, tokens, mask):
    out, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(tokens),
                                    positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    return np.asarray(out["logits"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_transformers(name, scan, tmp_path):
    cfg = CONFIGS[name].replace(scan_layers=scan)
    params = _randomize(jax.tree.map(np.asarray, init_params(cfg.replace(scan_layers=True),
                                                             jax.random.key(0))), seed=1)
    hf.write_hf_dir(str(tmp_path / "hf"), cfg, params)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :4] = 0  # left padding in the second row
    theirs = _torch_logits(str(tmp_path / "hf"), tokens, mask)
    ours = _our_logits(cfg, layout.to_model_layout(params, cfg), tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - theirs[valid]).max() <= 1e-4


def test_hf_import_roundtrip(tmp_path):
    cfg = CONFIGS["qwen2_bias"]
    params = _randomize(jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0))), seed=3)
    hf.write_hf_dir(str(tmp_path / "m"), cfg, params)
    cfg2, tensors = hf.read_hf_dir(str(tmp_path / "m"))
    assert cfg2 == cfg.replace(max_seq_len=cfg.max_seq_len)
    back = layout.from_hf(tensors, cfg2)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type 'bert'"):
        hf.config_from_hf({"model_type": "bert"}, "x/config.json")


def test_smollm2_export_reloads_in_transformers(smollm2, tmp_path):
    hf.write_hf_dir(str(tmp_path / "smol"), smollm2.config, smollm2.params, smollm2.tokenizer)
    ids = smollm2.tokenizer("Constitutional AI trains a harmless assistant.")["input_ids"]
    tokens = np.asarray([ids])
    mask = np.ones_like(tokens)
    theirs = _torch_logits(str(tmp_path / "smol"), tokens, mask)
    ours = _our_logits(smollm2.config, smollm2.params, tokens, mask)
    assert np.abs(ours - theirs).max() <= 1e-3  # 30 layers of float32 accumulate more rounding
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


# ------------------------------------------------------------- RoPE scaling

# Llama 3.1's published values, except a pretraining context of 32 so that a
# 64-token sequence runs past it; with head_dim 16 and theta 10000 the eight
# rotary pairs' wavelengths (6.3 ... 19869 tokens) fall on all three sides of
# the llama3 band (8 to 32 tokens): kept, blended and slowed 8x.
ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def _hf_llama_with_rope_scaling(directory, scaling, old_style: bool):
    """A random tiny LlamaForCausalLM written by transformers itself, with
    `scaling` as config.json's rope_scaling (old_style, as Llama 3.1's own
    config has it) or as transformers 5's rope_parameters."""
    rope = {"rope_scaling": dict(scaling), "rope_theta": 1e4} if old_style else \
        {"rope_parameters": {**scaling, "rope_theta": 1e4}}
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
        rms_norm_eps=1e-5, **rope)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # every weight random, norms included
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(directory)
    if old_style:  # transformers 5 writes rope_parameters; put the file back the way Llama 3.1 ships it
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            written = json.load(f)
        written.pop("rope_parameters", None)
        written.update(rope_scaling=scaling, rope_theta=1e4)
        with open(path, "w") as f:
            json.dump(written, f)


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
@pytest.mark.parametrize("old_style", [True, False], ids=["rope_scaling", "rope_parameters"])
def test_rope_scaling_matches_transformers(kind, old_style, tmp_path):
    """Weights and config.json written by transformers, read by our hf: loader;
    64 tokens, past the 32 the llama3 band is measured against. Without the
    scaling the same weights give other logits, so the test can fail."""
    directory = str(tmp_path / "hf")
    _hf_llama_with_rope_scaling(directory, ROPE_SCALINGS[kind], old_style)
    cfg, tensors = hf.read_hf_dir(directory)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == kind
    assert cfg.rope_scaling.factor == ROPE_SCALINGS[kind]["factor"]
    params = layout.to_model_layout(layout.from_hf(tensors, cfg), cfg)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, cfg.vocab_size, (2, 64))
    mask = np.ones((2, 64), np.int64)
    mask[1, :5] = 0  # left padding in the second row
    valid = mask.astype(bool)
    theirs = _torch_logits(directory, tokens, mask)
    ours = _our_logits(cfg, params, tokens, mask)
    assert np.abs(ours[valid] - theirs[valid]).max() <= 1e-4
    plain = _our_logits(cfg.replace(rope_scaling=None), params, tokens, mask)
    assert np.abs(plain[valid] - theirs[valid]).max() > 1e-2  # about 0.1: 100 times the tolerance


@pytest.mark.parametrize("name", ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct"])
def test_inverse_frequencies_equal_transformers_for_published_configs(name):
    """Our frequencies against transformers' own RoPE initialisation, for the
    published config.json files: Llama 3.1's 64 pairs span all three llama3
    bands (kept, blended, slowed 8x); Qwen2.5's are plain RoPE."""
    from cai_jax.models.rope import inverse_frequencies
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    path = os.path.join(os.path.dirname(__file__), "fixtures", "hf_configs", name, "config.json")
    with open(path) as f:
        published = json.load(f)
    cfg = hf.config_from_hf(published, path)
    config = transformers.AutoConfig.for_model(**published)
    kind = config.rope_parameters["rope_type"]
    theirs = (ROPE_INIT_FUNCTIONS[kind](config)[0] if kind != "default"
              else 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128)).numpy()
    ours = np.asarray(inverse_frequencies(cfg))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    plain = np.asarray(inverse_frequencies(cfg.replace(rope_scaling=None)))
    if name.startswith("llama"):
        ratio = plain / ours
        assert (ratio == 1).sum() > 10 and np.isclose(ratio, 8).sum() > 10
        assert ((ratio > 1.01) & (ratio < 7.99)).sum() > 0  # the blended band
    else:
        assert cfg.rope_scaling is None and (plain == ours).all()


def test_rope_scaling_survives_export_and_our_model_dir(tmp_path):
    """Our HF export writes the scaling transformers reads (same logits), and
    model.json keeps it."""
    from cai_jax.models.config import RopeScaling
    from cai_jax.weights import model_dir
    cfg = CONFIGS["llama_gqa_untied"].replace(rope_scaling=RopeScaling(**ROPE_SCALINGS["llama3"]))
    params = _randomize(jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0))), seed=5)
    hf.write_hf_dir(str(tmp_path / "hf"), cfg, params)
    assert hf.read_hf_dir(str(tmp_path / "hf"))[0] == cfg
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 48))
    mask = np.ones_like(tokens)
    theirs = _torch_logits(str(tmp_path / "hf"), tokens, mask)
    ours = _our_logits(cfg, layout.to_model_layout(params, cfg), tokens, mask)
    assert np.abs(ours - theirs).max() <= 1e-4
    model_dir.save_model_dir(str(tmp_path / "ckpt"), cfg, params)
    assert model_dir.read_model_config(str(tmp_path / "ckpt")) == cfg


@pytest.mark.parametrize("change, feature", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_scaling 'yarn' (factor 4.0) is not modelled"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling 'dynamic' (factor 2.0) is not modelled"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding-window attention (window 16) is not modelled"),
])
def test_weights_we_do_not_model_are_refused_in_one_line(change, feature, tmp_path):
    """hf:DIR with safetensors: one line naming config.json and the feature,
    exit 2 from the command line (tools/convert)."""
    import subprocess
    import sys
    from cai_jax.errors import NotModelledError, UserError
    cfg = CONFIGS["llama_gqa_untied"]
    hf.write_hf_dir(str(tmp_path / "hf"), cfg, init_params(cfg, jax.random.key(0)))
    path = tmp_path / "hf" / "config.json"
    written = json.loads(path.read_text())
    written.update(change)
    path.write_text(json.dumps(written))
    with pytest.raises(NotModelledError) as info:
        hf.read_hf_dir(str(tmp_path / "hf"))
    assert isinstance(info.value, UserError)
    assert str(info.value).startswith(f"{path}: {feature}") and "\n" not in str(info.value)
    if "yarn" not in feature:  # the command line once is enough
        return
    out = subprocess.run([sys.executable, "-m", "cai_jax.tools.convert", f"--src=hf:{tmp_path / 'hf'}",
                          f"--dst=ckpt:{tmp_path / 'ckpt'}"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2 and out.stderr.strip() == f"error: {info.value}", out.stderr[-2000:]
