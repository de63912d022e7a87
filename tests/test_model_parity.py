"""Our Flax decoder against transformers' torch implementations (independent code).

Random small weights go through our HF export; transformers loads them and must
produce the same logits (float32, max abs diff <= 1e-4).
"""
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
