"""Model switches: KV-cache decoding, remat, scan, dtypes, the scalar head."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models.config import model_config_from_dict
from cai_jax.models.transformer import Transformer, init_cache, init_params, positions_from_mask
from cai_jax.models.layer_layout import stack_layers, unstack_layers

CFG = model_config_from_dict({"name": "tiny", "vocab_size": 128})


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _full(cfg, params, tokens, mask):
    out, _ = Transformer(cfg).apply({"params": params}, tokens, positions_from_mask(mask), mask)
    return out


def test_cached_decoding_matches_full_forward(params):
    # Left-padded batch: prefill 5 slots, then decode 3 tokens one at a time.
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 8)))
    mask = jnp.asarray([[1] * 8, [0, 0] + [1] * 6])
    full = _full(CFG, params, tokens, mask)["logits"]
    model = Transformer(CFG)
    cache = init_cache(CFG, 2, 8)
    pos = positions_from_mask(mask)
    out, cache = model.apply({"params": params}, tokens[:, :5], pos[:, :5], mask, cache=cache, cache_index=0)
    np.testing.assert_allclose(out["logits"][1, 2:], full[1, 2:5], atol=1e-5)
    for t in range(5, 8):
        out, cache = model.apply({"params": params}, tokens[:, t:t + 1], pos[:, t:t + 1], mask,
                                 cache=cache, cache_index=t)
        np.testing.assert_allclose(out["logits"][:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_unscanned_layers_give_the_same_gradients(params, remat):
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 128, (2, 6)))
    mask = jnp.ones_like(tokens)

    def loss(cfg, p):
        return _full(cfg, p, tokens, mask)["logits"].std()

    ref = jax.grad(lambda p: loss(CFG, p))(params)
    cfg = CFG.replace(remat=remat, scan_layers=False)
    got = jax.grad(lambda p: loss(cfg, p))(unstack_layers(params, CFG.num_layers))
    got = stack_layers(jax.tree.map(np.asarray, got), CFG.num_layers)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-6)


def test_bfloat16_compute_and_params_stay_close_to_float32(params):
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 128, (1, 6)))
    mask = jnp.ones_like(tokens)
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    low = _full(cfg, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens, mask)
    high = _full(CFG, params, tokens, mask)
    assert low["logits"].dtype == jnp.float32  # logits always come back in float32
    assert jax.tree.leaves(init_params(cfg, jax.random.key(0)))[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(low["logits"], high["logits"], atol=0.05)


def test_scalar_head_on_the_same_trunk(params):
    cfg = CFG.replace(heads=("lm", "scalar"))
    both = init_params(cfg, jax.random.key(0))
    assert both["scalar_head"]["kernel"].shape == (CFG.d_model, 1)
    # Same trunk weights -> same hidden states; the head is a linear read-out of them.
    both = {**params, "scalar_head": {"kernel": jnp.ones((CFG.d_model, 1)), "bias": jnp.full((1,), 0.5)}}
    tokens = jnp.asarray([[5, 6, 7]])
    out = _full(cfg, both, tokens, jnp.ones_like(tokens))
    np.testing.assert_allclose(out["scalar"], out["hidden"].sum(-1) + 0.5, atol=1e-4)
    np.testing.assert_allclose(out["logits"], _full(CFG, params, tokens, jnp.ones_like(tokens))["logits"], atol=1e-6)


def test_heads_on_a_span_of_positions_equal_the_full_output_sliced(params):
    """head_span (PPO's answer positions): the same logits, values and gradients
    as the heads on every position, sliced afterwards."""
    cfg = CFG.replace(heads=("lm", "scalar"))
    both = {**params, "scalar_head": {"kernel": jnp.ones((CFG.d_model, 1)) * 0.1, "bias": jnp.full((1,), 0.5)}}
    tokens = jnp.asarray([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    model = Transformer(cfg)

    def loss(p, span):
        out, _ = model.apply({"params": p}, tokens, positions_from_mask(mask), mask, head_span=span)
        logits, values = (out["logits"], out["scalar"]) if span else (out["logits"][:, 3:6], out["scalar"][:, 3:6])
        return jax.nn.log_softmax(logits)[..., 0].sum() + values.sum(), (logits, values)

    (full, (lf, vf)), g_full = jax.value_and_grad(loss, has_aux=True)(both, None)
    (span, (ls, vs)), g_span = jax.value_and_grad(loss, has_aux=True)(both, (3, 6))
    assert ls.shape == (2, 3, CFG.vocab_size)
    np.testing.assert_allclose(ls, lf, atol=1e-6)
    np.testing.assert_allclose(vs, vf, atol=1e-6)
    assert abs(float(full) - float(span)) < 1e-5
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_span)):
        np.testing.assert_allclose(a, b, atol=1e-6)
