"""The chunked next-token log-probs against the whole [B, T, V] computation
(values and gradients) and a NumPy loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models.config import model_config_from_dict
from cai_jax.models.transformer import Transformer, positions_from_mask
from cai_jax.training import lm_loss


def _whole(hidden, weight, targets):
    logits = jnp.einsum("btd,vd->btv", hidden, weight, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("t, chunk", [(12, 4), (13, 4), (5, 64), (7, 1)])
def test_chunked_logprobs_and_gradients_equal_the_whole_tensor(t, chunk):
    rng = np.random.default_rng(0)
    b, d, v = 3, 8, 50
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    g = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)  # an arbitrary cotangent

    chunked = lm_loss.target_logprobs(hidden, weight, targets, chunk)
    np.testing.assert_allclose(chunked, _whole(hidden, weight, targets), atol=1e-5)

    # NumPy loop, float64
    h64, w64 = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
    for i in range(b):
        for j in range(t):
            z = w64 @ h64[i, j]
            ref = z[int(targets[i, j])] - (z.max() + np.log(np.exp(z - z.max()).sum()))
            assert abs(float(chunked[i, j]) - ref) < 1e-4

    def grads(fn):
        return jax.grad(lambda h, w: (fn(h, w) * g).sum(), argnums=(0, 1))(hidden, weight)

    got = jax.jit(grads, static_argnums=0)(lambda h, w: lm_loss.target_logprobs(h, w, targets, chunk))
    want = grads(lambda h, w: _whole(h, w, targets))
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_the_sft_loss_and_its_gradient_match_the_models_own_logits(tied):
    cfg = model_config_from_dict({"name": "tiny", "tie_embeddings": tied})
    model = Transformer(cfg)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 21)), jnp.int32)
    mask = jnp.ones_like(tokens).at[0, :5].set(0)  # a left-padded row
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, positions_from_mask(mask), mask)["params"])
    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": mask}

    def reference_loss(p):
        outputs, _ = model.apply({"params": p}, tokens, positions_from_mask(mask), mask)
        logp = jax.nn.log_softmax(outputs["logits"][:, :-1], axis=-1)
        logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -(logp * mask[:, 1:]).sum()

    def chunked_loss(p):
        total, count, _ = lm_loss.make_lm_loss(model)(p, batch, None)
        return total, count

    (value, count), grad = jax.jit(jax.value_and_grad(chunked_loss, has_aux=True))(params)
    assert float(count) == float(mask[:, 1:].sum())
    ref_value, ref_grad = jax.value_and_grad(reference_loss)(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(grad):
        e = dict(jax.tree_util.tree_leaves_with_path(ref_grad))[path]
        # Float32 sums in another order: an absolute error relative to the
        # leaf's largest entry (one entry of the tied embedding's 3M was off
        # by 1.2e-6 on an AMD EPYC machine, where 1e-6 flat had passed on Intel).
        atol = 1e-5 * float(np.abs(e).max())
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
