import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.rl_cai.bt_loss import preference_accuracy, soft_bt_loss, soft_bt_loss_mean


def np_loss(ra, rb, p):
    # -log sigmoid(x) = log(1 + exp(-x)), written with logaddexp for stability
    d = ra - rb
    return p * np.logaddexp(0.0, -d) + (1 - p) * np.logaddexp(0.0, d)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_value_and_gradient_against_numpy():
    rng = np.random.default_rng(0)
    ra = rng.normal(size=8)
    rb = rng.normal(size=8)
    p = rng.random(8)
    args = [jnp.asarray(x, jnp.float32) for x in (ra, rb, p)]

    total, count = soft_bt_loss(*args)
    assert float(total) == pytest.approx(np_loss(ra, rb, p).sum(), rel=1e-5)
    assert float(count) == 8.0
    assert float(soft_bt_loss_mean(*args)) == pytest.approx(np_loss(ra, rb, p).mean(), rel=1e-5)

    # Hand-derived: d loss / d r_a = sigmoid(r_a - r_b) - p, and the opposite for r_b.
    ga, gb = jax.grad(lambda a, b: soft_bt_loss(a, b, args[2])[0], argnums=(0, 1))(args[0], args[1])
    np.testing.assert_allclose(ga, np_sigmoid(ra - rb) - p, atol=1e-6)
    np.testing.assert_allclose(gb, p - np_sigmoid(ra - rb), atol=1e-6)


def test_hard_labels_reduce_to_log_sigmoid():
    ra = np.array([0.3, -1.0, 2.0])
    rb = np.array([0.0, 0.5, 2.5])
    total, _ = soft_bt_loss(jnp.asarray(ra), jnp.asarray(rb), jnp.ones(3))
    expected = sum(-np.log(1.0 / (1.0 + np.exp(-(a - b)))) for a, b in zip(ra, rb))
    assert float(total) == pytest.approx(expected, rel=1e-6)


def test_half_label_minimised_at_equal_scores():
    # p = 0.5 gives loss log 2 at r_a == r_b and zero gradient there.
    total, _ = soft_bt_loss(jnp.array([1.0]), jnp.array([1.0]), jnp.array([0.5]))
    assert float(total) == pytest.approx(np.log(2.0), rel=1e-6)


def test_stable_at_large_differences():
    ra = jnp.array([100.0, -100.0, 100.0, -100.0])
    rb = jnp.zeros(4)
    p = jnp.array([1.0, 1.0, 0.0, 0.7])
    per_pair = [float(soft_bt_loss(ra[i : i + 1], rb[i : i + 1], p[i : i + 1])[0]) for i in range(4)]
    # right and confident -> ~0; wrong and confident -> ~100; mixed 0.7 label at -100 -> 0.7*100
    np.testing.assert_allclose(per_pair, [0.0, 100.0, 100.0, 70.0], atol=1e-4)
    g = jax.grad(lambda a: soft_bt_loss(a, rb, p)[0])(ra)
    np.testing.assert_allclose(g, [0.0, -1.0, 1.0, -0.7], atol=1e-6)
    assert np.all(np.isfinite(np.asarray(g)))


def test_mask_drops_pairs():
    ra = jnp.array([1.0, 5.0, -2.0])
    rb = jnp.array([0.0, 0.0, 0.0])
    p = jnp.array([0.9, jnp.nan, 0.2])  # padded slot may hold garbage
    total, count = soft_bt_loss(ra, rb, p, mask=jnp.array([1.0, 0.0, 1.0]))
    expected = np_loss(np.array([1.0, -2.0]), np.zeros(2), np.array([0.9, 0.2])).sum()
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert float(count) == 2.0


def test_accuracy_by_hand():
    ra = jnp.array([1.0, 1.0, 0.0, 2.0, 3.0, 1.0])
    rb = jnp.array([0.0, 2.0, 1.0, 2.0, 1.0, 0.0])
    p = jnp.array([0.9, 0.8, 0.3, 0.7, 0.5, 0.2])
    # pair: 1 right, 2 wrong, 3 right (b preferred and scored higher),
    # 4 score tie -> wrong, 5 label tie -> excluded, 6 wrong
    correct, counted = preference_accuracy(ra, rb, p)
    assert float(correct) == 2.0
    assert float(counted) == 5.0
