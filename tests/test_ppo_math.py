import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models.transformer import last_valid_index
from cai_jax.rl_cai.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty_rewards,
    ppo_policy_loss,
    value_loss,
    whiten,
)


def gae_reference(rewards, values, mask, gamma, lam):
    """Direct double loop: A_t = sum_k (gamma*lam)^k delta over the following answer tokens."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[b] > 0)  # the answer tokens, in order
        deltas = []
        for i, t in enumerate(steps):
            v_next = values[b, steps[i + 1]] if i + 1 < len(steps) else 0.0
            deltas.append(rewards[b, t] + gamma * v_next - values[b, t])
        for i, t in enumerate(steps):
            adv[b, t] = sum((gamma * lam) ** (j - i) * deltas[j] for j in range(i, len(steps)))
    return adv, (adv + values) * mask


def test_gae_matches_double_loop():
    rng = np.random.default_rng(0)
    b, t = 6, 9
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    mask = np.zeros((b, t), np.float32)
    mask[0, :] = 1  # full row
    mask[1, :4] = 1  # right padded
    mask[2, 3:7] = 1  # prompt prefix, answer, padding
    mask[3, 8] = 1  # single answer token at the end
    mask[4, [1, 2, 5]] = 1  # a gap inside the answer
    # row 5 empty: nothing to learn from
    fn = jax.jit(gae, static_argnums=(3, 4))
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)]:
        adv, ret = fn(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
        ref_adv, ref_ret = gae_reference(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
        np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
        np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
        assert np.all(np.asarray(adv)[mask == 0] == 0.0)


def test_gae_monte_carlo_by_hand():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t.
    rewards = jnp.array([[9.0, 0.0, 0.0, 1.0, 7.0]])
    values = jnp.array([[3.0, 0.5, 0.2, 0.1, 4.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0, 0.0]])  # prompt token, 3 answer tokens, pad
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[0.0, 0.5, 0.8, 0.9, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, 1.0, 1.0, 1.0, 0.0]], atol=1e-6)


def test_gae_one_step_td_by_hand():
    # lam = 0: A_t = r_t + gamma V_{t+1} - V_t, with V after the last token = 0.
    rewards = jnp.array([[1.0, 2.0]])
    values = jnp.array([[0.5, 3.0]])
    adv, _ = gae(rewards, values, jnp.ones((1, 2)), 0.5, 0.0)
    np.testing.assert_allclose(adv, [[1.0 + 0.5 * 3.0 - 0.5, 2.0 - 3.0]], atol=1e-6)


def test_whiten_zero_mean_unit_variance_on_mask():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 5.0, size=(4, 7)).astype(np.float32)
    mask = (rng.random((4, 7)) < 0.6).astype(np.float32)
    sel = x[mask > 0].astype(np.float64)
    out = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask > 0], (sel - sel.mean()) / sel.std(), atol=1e-5)
    assert abs(out[mask > 0].mean()) < 1e-6
    assert out[mask > 0].var() == pytest.approx(1.0, abs=1e-5)
    assert np.all(out[mask == 0] == 0.0)

    # A floor below the spread changes nothing; above it, the values are only centred and divided by it.
    floored = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask), min_std=1.0))
    np.testing.assert_allclose(floored, out, atol=1e-6)
    tiny = x * 1e-3
    sel_tiny = tiny[mask > 0].astype(np.float64)
    out_tiny = np.asarray(whiten(jnp.asarray(tiny), jnp.asarray(mask), min_std=1.0))
    np.testing.assert_allclose(out_tiny[mask > 0], sel_tiny - sel_tiny.mean(), atol=1e-6)

    kept = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))[mask > 0]
    assert kept.mean() == pytest.approx(sel.mean(), abs=1e-4)
    assert kept.var() == pytest.approx(1.0, abs=1e-4)


# A 2x3 batch with old log-probs 0, so ratio r = exp(new) is written directly.
RATIOS = np.array([[1.5, 0.7, 1.1], [0.5, 1.3, 2.0]])
ADV = np.array([[1.0, -2.0, 3.0], [2.0, -1.0, 5.0]])
MASK = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_policy_loss_by_hand():
    logp_new = jnp.asarray(np.log(RATIOS), jnp.float32)
    logp_old = jnp.zeros((2, 3))
    loss_sum, count, stats = ppo_policy_loss(logp_new, logp_old, jnp.asarray(ADV), jnp.asarray(MASK), 0.2)
    # Per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A= 1: max(-1.5, -1.2) = -1.2   clipped term active
    #   r=0.7, A=-2: max( 1.4,  1.6) =  1.6   clipped term active
    #   r=1.1, A= 3: max(-3.3, -3.3) = -3.3
    #   r=0.5, A= 2: max(-1.0, -1.6) = -1.0   outside the range but unclipped wins
    #   r=1.3, A=-1: max( 1.3,  1.2) =  1.3
    #   r=2.0, A= 5: masked out
    assert float(loss_sum) == pytest.approx(-1.2 + 1.6 - 3.3 - 1.0 + 1.3, abs=1e-5)
    assert float(count) == 5.0
    assert float(stats["clip_frac"]) == pytest.approx(2 / 5)
    r = np.array([1.5, 0.7, 1.1, 0.5, 1.3])
    assert float(stats["approx_kl_k1"]) == pytest.approx(-np.log(1.5 * 0.7 * 1.1 * 0.5 * 1.3) / 5, abs=1e-6)
    assert float(stats["approx_kl_k3"]) == pytest.approx(np.mean(r - 1 - np.log(r)), abs=1e-6)


def test_policy_loss_gradient_by_hand():
    # d/d logp_new of -A r is -A r where the unclipped term is active, 0 where
    # the clipped (constant) term is active, and 0 on masked tokens.
    def f(logp_new):
        s, _, _ = ppo_policy_loss(logp_new, jnp.zeros((2, 3)), jnp.asarray(ADV), jnp.asarray(MASK), 0.2)
        return s

    g = jax.grad(f)(jnp.asarray(np.log(RATIOS), jnp.float32))
    np.testing.assert_allclose(g, [[0.0, 0.0, -3.3], [-1.0, 1.3, 0.0]], atol=1e-5)


def test_losses_sum_over_microbatches_to_global_mean():
    logp_new = jnp.asarray(np.log(RATIOS), jnp.float32)
    args = (logp_new, jnp.zeros((2, 3)), jnp.asarray(ADV), jnp.asarray(MASK))
    s_all, c_all, _ = ppo_policy_loss(*args, 0.2)
    parts = [ppo_policy_loss(*(a[i : i + 1] for a in args), 0.2) for i in range(2)]
    assert float(parts[0][0] + parts[1][0]) == pytest.approx(float(s_all), abs=1e-6)
    assert float(parts[0][1] + parts[1][1]) == float(c_all)


def test_value_loss_by_hand():
    v_old = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    v_new = jnp.array([[1.5, 1.0, 3.05], [9.0, 9.0, 9.0]])
    ret = jnp.array([[2.0, 2.5, 3.0], [0.0, 1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    s, c = value_loss(v_new, v_old, ret, mask, 0.2)
    # v=1.5  R=2.0 clip->1.2 : 0.5*max(0.25, 0.64)   = 0.32
    # v=1.0  R=2.5 clip->1.8 : 0.5*max(2.25, 0.49)   = 1.125
    # v=3.05 R=3.0 unclipped : 0.5*0.0025            = 0.00125
    # v=9.0  R=1.0 clip->0.2 : 0.5*max(64, 0.64)     = 32
    assert float(s) == pytest.approx(0.32 + 1.125 + 0.00125 + 32.0, abs=1e-5)
    assert float(c) == 4.0


def test_entropy_against_numpy_loop():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    logits[1, 2, 0] = -np.inf  # a banned token must not produce NaN
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], np.float32)
    expected = 0.0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                z = logits[b, t].astype(np.float64)
                p = np.exp(z - z.max())
                p /= p.sum()
                expected -= sum(pi * math.log(pi) for pi in p if pi > 0)
    s, c = entropy_from_logits(jnp.asarray(logits), jnp.asarray(mask))
    assert float(s) == pytest.approx(expected, abs=1e-5)
    assert float(c) == 4.0
    g = jax.grad(lambda x: entropy_from_logits(x, jnp.asarray(mask))[0])(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(g)))
    # uniform over 5 tokens: entropy log 5
    s_u, _ = entropy_from_logits(jnp.zeros((1, 1, 5)), jnp.ones((1, 1)))
    assert float(s_u) == pytest.approx(math.log(5), abs=1e-6)


def test_kl_penalty_is_exactly_zero_when_policy_equals_ref():
    rng = np.random.default_rng(3)
    logp = jnp.asarray(-rng.random((3, 6)) * 5, jnp.float32)
    mask = jnp.asarray([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], jnp.float32)
    last = jnp.array([3, 5, 2])
    score = jnp.array([0.5, -1.0, 2.0])
    rewards, k1, k3 = kl_penalty_rewards(logp, logp, mask, score, 0.3, last)
    expected = np.zeros((3, 6))
    expected[[0, 1, 2], [3, 5, 2]] = [0.5, -1.0, 2.0]
    np.testing.assert_array_equal(rewards, expected)
    np.testing.assert_array_equal(k1, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(k3, [0.0, 0.0, 0.0])


def test_kl_penalty_by_hand():
    pol = jnp.array([[-1.0, -2.0, -0.5, -3.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, -0.1]])
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0]])  # prompt, 2 answer tokens, pad
    rewards, k1, k3 = kl_penalty_rewards(pol, ref, mask, jnp.array([2.0]), 0.1, jnp.array([2]))
    # pol - ref on the answer: [-1, 0] -> reward -0.1*(-1) = 0.1; score on token 2.
    np.testing.assert_allclose(rewards, [[0.0, 0.1, 2.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(k1, [-1.0], atol=1e-6)
    # k3 = exp(ref-pol) - 1 - (ref-pol) with ref-pol = 1 on token 1: e - 2
    np.testing.assert_allclose(k3, [math.e - 2.0], atol=1e-6)
    assert float(k3[0]) >= 0.0


def test_last_valid_index():
    mask = jnp.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(last_valid_index(mask), [2, 3, 0, 0])


def test_adaptive_kl_controller_formula():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000.0)
    beta = ctl.init()
    assert float(beta) == pytest.approx(0.1)
    n = 256
    # KL far below target: error clipped to -0.2
    assert float(ctl.update(beta, 3.0, n)) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000), rel=1e-6)
    # slightly above: error 6.6/6 - 1 = 0.1
    assert float(ctl.update(beta, 6.6, n)) == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000), rel=1e-6)
    # far above: clipped to +0.2
    assert float(ctl.update(beta, 100.0, n)) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000), rel=1e-6)
    # on target: unchanged
    assert float(ctl.update(beta, 6.0, n)) == pytest.approx(0.1, rel=1e-6)

    # state threads through jit-compiled updates
    step = jax.jit(ctl.update, static_argnums=2)
    b, expected = beta, 0.1
    for kl in [1.0, 7.0, 12.0]:
        b = step(b, jnp.float32(kl), 64)
        expected *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * 64 / 10000
    assert float(b) == pytest.approx(expected, rel=1e-5)


def test_fixed_kl_controller():
    ctl = FixedKLController(init_beta=0.05)
    beta = ctl.init()
    assert float(ctl.update(beta, 100.0, 256)) == pytest.approx(0.05)


def test_explained_variance():
    rng = np.random.default_rng(4)
    ret = rng.normal(size=(3, 5)).astype(np.float32)
    val = (ret + 0.5 * rng.normal(size=(3, 5))).astype(np.float32)
    mask = (rng.random((3, 5)) < 0.7).astype(np.float32)
    r, v = ret[mask > 0].astype(np.float64), val[mask > 0].astype(np.float64)
    expected = 1 - np.var(r - v) / np.var(r)
    got = explained_variance(jnp.asarray(val), jnp.asarray(ret), jnp.asarray(mask))
    assert float(got) == pytest.approx(expected, abs=1e-5)
    assert float(explained_variance(jnp.asarray(ret), jnp.asarray(ret), jnp.asarray(mask))) == pytest.approx(1.0)
    const = jnp.ones((2, 3))
    assert np.isnan(float(explained_variance(jnp.zeros((2, 3)), const, jnp.ones((2, 3)))))
