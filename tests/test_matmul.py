"""models/matmul.py: bfloat16-operand products against NumPy, and the models that use them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cai_jax.models import matmul
from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import Transformer, init_params, positions_from_mask
from cai_jax.training import lm_loss


def _bf16_values(x) -> np.ndarray:
    """x rounded to bfloat16 (round to nearest even), as float64."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


SPECS = [("ij,jk->ik", (5, 7), (7, 3)),
         ("btd,vd->btv", (2, 5, 8), (11, 8)),
         ("bkrd,bkds->bkrs", (2, 3, 4, 5), (2, 3, 5, 6)),
         ("bcd,bcv->dv", (2, 4, 5), (2, 4, 9))]


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
def test_bfloat16_product_and_its_gradients_match_numpy_on_rounded_operands(spec, shape_a, shape_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape_a).astype(np.float32)
    b = rng.standard_normal(shape_b).astype(np.float32)
    out, vjp = jax.vjp(lambda a, b: matmul.einsum(spec, a, b, "bfloat16"), a, b)
    g = rng.standard_normal(out.shape).astype(np.float32)
    grad_a, grad_b = vjp(g)

    a64, b64, g64 = _bf16_values(a), _bf16_values(b), _bf16_values(g)
    inputs, out_idx = spec.split("->")
    ia, ib = inputs.split(",")
    np.testing.assert_allclose(out, np.einsum(spec, a64, b64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_a, np.einsum(f"{out_idx},{ib}->{ia}", g64, b64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_b, np.einsum(f"{ia},{out_idx}->{ib}", a64, g64), rtol=1e-5, atol=1e-5)
    assert out.dtype == jnp.float32 and grad_a.dtype == jnp.float32
    # The rounding is real: the unrounded float32 product differs.
    assert np.abs(np.asarray(out) - np.einsum(spec, a.astype(np.float64), b.astype(np.float64))).max() > 1e-4


def test_float32_is_the_plain_product():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    np.testing.assert_array_equal(matmul.einsum("ij,jk->ik", a, b), jnp.einsum("ij,jk->ik", a, b))
    assert matmul.dot_general("float32") is lax.dot_general


@pytest.mark.parametrize("dims,shape_a,shape_b", [
    ((((2,), (0,)), ((), ())), (2, 5, 7), (7, 4, 3)),        # Dense onto several output axes
    ((((2, 3), (0, 1)), ((), ())), (2, 5, 4, 6), (4, 6, 3)),  # Dense over several input axes (attention's o)
    ((((3,), (2,)), ((0, 1), (0, 1))), (2, 3, 5, 7), (2, 3, 7, 4)),  # batched
])
def test_dot_general_for_flax_matches_lax_on_bfloat16_exact_values(dims, shape_a, shape_b):
    # Values bfloat16 holds exactly: rounding changes nothing, so the product and
    # its gradients must equal lax.dot_general's (up to float32 summation order).
    rng = np.random.default_rng(2)
    a = _bf16_values(rng.standard_normal(shape_a)).astype(np.float32)
    b = _bf16_values(rng.standard_normal(shape_b)).astype(np.float32)
    ours = lambda a, b: matmul.dot_general("bfloat16")(a, b, dims)
    ref = lambda a, b: lax.dot_general(a, b, dims)
    out, vjp = jax.vjp(ours, a, b)
    want, vjp_ref = jax.vjp(ref, a, b)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    g = _bf16_values(rng.standard_normal(out.shape)).astype(np.float32)
    for got, expected in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_specs_and_dtypes_are_one_line_errors():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="summed alone"):
        matmul.einsum("ij,jk->k", x, jnp.ones((3, 4)), "bfloat16")
    with pytest.raises(ValueError, match="explicit output"):
        matmul.einsum("ij,jk", x, jnp.ones((3, 4)), "bfloat16")
    with pytest.raises(ValueError, match="model.matmul_dtype"):
        matmul.einsum("ij,jk->ik", x, jnp.ones((3, 4)), "float16")
    with pytest.raises(ValueError, match="model.matmul_dtype"):
        TransformerConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                          mlp_dim=8, matmul_dtype="int8")


def _tiny(**changes):
    return TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                             mlp_dim=48, max_seq_len=64, **changes)


def test_model_at_bfloat16_products_stays_close_to_float32_and_trains():
    cfg = _tiny()
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 12)), jnp.int32)
    mask = jnp.ones_like(tokens)
    params = init_params(cfg, jax.random.key(0))
    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": mask}
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = Transformer(cfg.replace(matmul_dtype=dtype))
        logits = model.apply({"params": params}, tokens, positions_from_mask(mask), mask)[0]["logits"]
        loss_fn = lm_loss.make_lm_loss(model)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0])(params)
        results[dtype] = (np.asarray(logits), float(loss), grads)
    (l32, loss32, g32), (l16, loss16, g16) = results["float32"], results["bfloat16"]
    assert 0 < np.abs(l16 - l32).max() < 0.02 * np.abs(l32).max()
    assert abs(loss16 - loss32) < 1e-2 * abs(loss32)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
