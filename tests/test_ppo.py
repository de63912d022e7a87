"""PPO pieces checked against independent computations: the answer slice of the
forward pass, the first update's gradients, clipping, rewards, packing, prompt
mixing, and sharded against single-device updates."""
import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cai_jax import sharding as shd
from cai_jax.data.conversation import Turn
from cai_jax.models.config import model_config_from_dict
from cai_jax.models.transformer import Transformer, init_params
from cai_jax.rl_cai import ppo_update, rollout as ro
from cai_jax.training import lm_loss

POLICY_CFG = model_config_from_dict({"name": "tiny", "vocab_size": 256})
VALUE_CFG = POLICY_CFG.replace(heads=("scalar",))
PROMPT, ANSWER, BATCH = 5, 6, 4
LR = 0.1


def _rows(seed=0):
    """Left-padded prompts of 2..5 tokens followed by right-padded answers of 1..6."""
    rng = np.random.default_rng(seed)
    t = PROMPT + ANSWER
    prompt_len = np.array([2, 5, 3, 4])
    answer_len = np.array([6, 1, 4, 3])
    cols = np.arange(t)[None]
    attention = ((cols >= PROMPT - prompt_len[:, None]) & (cols < PROMPT + answer_len[:, None]))
    tokens = rng.integers(1, 256, (BATCH, t)).astype(np.int32) * attention
    action = (np.arange(ANSWER)[None] < answer_len[:, None]).astype(np.float32)
    return tokens, attention.astype(np.int32), action


@pytest.fixture(scope="module")
def models():
    policy = jax.tree.map(np.asarray, init_params(POLICY_CFG, jax.random.key(0)))
    value = jax.tree.map(np.asarray, init_params(VALUE_CFG, jax.random.key(1)))
    # A non-zero value head, so values differ per position.
    value["scalar_head"]["kernel"] = np.random.default_rng(2).normal(
        0, 0.5, value["scalar_head"]["kernel"].shape).astype(np.float32)
    return policy, value


@pytest.fixture(scope="module")
def steps():
    """Plain SGD so that one step's parameter change is -LR * gradient."""
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    hyper = ppo_update.PPOHyper(clip_eps=0.2, value_clip_eps=0.2, entropy_coef=0.0, epochs=1,
                                minibatch_size=BATCH)
    sgd = optax.sgd(LR)
    return ppo_update.build_ppo_steps(mesh=mesh, hyper=hyper, policy_config=POLICY_CFG,
                                      policy_optimizer=sgd, value_config=VALUE_CFG,
                                      value_optimizer=sgd), sgd


def _logp_and_values(policy, value, tokens, attention):
    out_p = ppo_update.answer_outputs(Transformer(POLICY_CFG), policy, tokens, attention, ANSWER)
    out_v = ppo_update.answer_outputs(Transformer(VALUE_CFG), value, tokens, attention, ANSWER)
    return np.asarray(out_p["logp"]), np.asarray(out_v["values"])


def test_answer_outputs_are_the_answer_slice_of_the_forward_pass(models):
    policy, value = models
    tokens, attention, action = _rows()
    logp, values = _logp_and_values(policy, value, tokens, attention)
    positions = np.maximum(np.cumsum(attention, 1) - 1, 0)
    full, _ = Transformer(POLICY_CFG).apply({"params": policy}, tokens, positions, attention)
    logits = np.asarray(full["logits"], np.float64)
    scalar, _ = Transformer(VALUE_CFG).apply({"params": value}, tokens, positions, attention)
    scalar = np.asarray(scalar["scalar"])
    for b in range(BATCH):
        for j in range(int(action[b].sum())):
            t = PROMPT + j  # the answer token's column; predicted at t - 1
            row = logits[b, t - 1]
            logz = row.max() + np.log(np.exp(row - row.max()).sum())
            assert abs(logp[b, j] - (row[tokens[b, t]] - logz)) < 1e-4
            assert abs(values[b, j] - scalar[b, t - 1]) < 1e-6


def _batch(models, logp_old_shift=0.0, advantages=None, seed=0):
    policy, value = models
    tokens, attention, action = _rows()
    logp, values = _logp_and_values(policy, value, tokens, attention)
    rng = np.random.default_rng(seed)
    if advantages is None:
        advantages = rng.normal(0, 1, action.shape).astype(np.float32)
    return {"tokens": tokens, "attention_mask": attention, "action_mask": action,
            "logp_old": (logp + logp_old_shift) * action, "values_old": values * action,
            "advantages": advantages * action,
            "returns": rng.normal(0, 1, action.shape).astype(np.float32) * action}


def _update(steps, models, batch):
    built, _ = steps
    policy, value = models
    p_state = built.policy.init_state(policy)
    v_state = built.value.init_state(value)
    p_state, v_state, metrics = ppo_update.ppo_update(built, p_state, v_state, batch,
                                                      jax.random.key(0))
    return jax.tree.map(np.asarray, p_state.params), jax.tree.map(np.asarray, v_state.params), metrics


def test_first_update_is_the_policy_gradient_and_the_value_regression(steps, models):
    # At the first step ratio = 1, so the clipped surrogate's gradient is the
    # plain policy gradient -mean_tokens(A * grad log pi), and the clipped value
    # loss is 0.5 * mean_tokens((V - R)^2). Both derived here through
    # lm_loss.token_logprobs and the raw model, not through ppo_update's losses.
    policy, value = models
    batch = _batch(models)
    new_policy, new_value, metrics = _update(steps, models, batch)
    mask = batch["action_mask"]
    count = mask.sum()

    def pg_objective(p):
        logp_all = lm_loss.token_logprobs(Transformer(POLICY_CFG), p, batch["tokens"],
                                          batch["attention_mask"])[:, PROMPT - 1:]
        return -jnp.sum(batch["advantages"] * logp_all * mask) / count

    def value_objective(p):
        positions = jnp.maximum(jnp.cumsum(batch["attention_mask"], 1) - 1, 0)
        out, _ = Transformer(VALUE_CFG).apply({"params": p}, batch["tokens"], positions,
                                              batch["attention_mask"])
        v = out["scalar"][:, PROMPT - 1:-1]
        return 0.5 * jnp.sum(jnp.square(v - batch["returns"]) * mask) / count

    for objective, before, after in ((pg_objective, policy, new_policy),
                                     (value_objective, value, new_value)):
        grads = jax.grad(objective)(jax.tree.map(jnp.asarray, before))
        for g, b, a in zip(jax.tree.leaves(grads), jax.tree.leaves(before), jax.tree.leaves(after)):
            step = -LR * np.asarray(g)
            # The gradient here and ppo_update's are float32 sums in another
            # order: an entry near 0 is off by a few ulps of the leaf's largest
            # (2.4e-6 in a leaf reaching 4.5, on an AMD EPYC, where the flat 1e-6
            # had 2.5x to spare), so the absolute slack scales with the leaf;
            # 1e-6 stays the floor for the float32 subtraction a - b.
            atol = max(1e-6, 1e-5 * float(np.abs(step).max()))
            np.testing.assert_allclose(a - b, step, atol=atol, rtol=1e-4)
    assert metrics["clip_frac"] == 0.0
    assert abs(metrics["approx_kl_k1"]) < 1e-6 and abs(metrics["approx_kl_k3"]) < 1e-6
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-6
    assert abs(metrics["policy_loss"] - (-(batch["advantages"] * mask).sum() / count)) < 1e-5
    assert abs(metrics["value_loss"] - 0.5 * (np.square(batch["values_old"] - batch["returns"])
                                              * mask).sum() / count) < 1e-5


def test_clipped_tokens_give_no_policy_gradient(steps, models):
    # logp_old 1 nat below the current log-prob: ratio e > 1 + 0.2 everywhere,
    # and with positive advantages the clipped (constant) term is the active one.
    policy, _ = models
    batch = _batch(models, logp_old_shift=-1.0, advantages=np.ones((BATCH, ANSWER), np.float32))
    new_policy, _, metrics = _update(steps, models, batch)
    assert metrics["clip_frac"] == 1.0
    assert abs(metrics["ratio_mean"] - np.e) < 1e-4
    assert abs(metrics["approx_kl_k1"] - (-1.0)) < 1e-5
    assert abs(metrics["approx_kl_k3"] - (np.e - 2.0)) < 1e-5
    for b, a in zip(jax.tree.leaves(policy), jax.tree.leaves(new_policy)):
        np.testing.assert_array_equal(a, b)


def test_advantages_are_whitened_gae():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
    values = rng.normal(size=mask.shape).astype(np.float32) * mask
    hyper = ppo_update.PPOHyper(gamma=1.0, lam=0.9)
    adv, returns = ppo_update.compute_advantages(rewards, values, mask, hyper)
    raw = np.zeros_like(rewards)
    for b in range(2):
        n = int(mask[b].sum())
        next_adv, next_v = 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[b, t] + next_v - values[b, t]
            next_adv = delta + 0.9 * next_adv
            next_v = values[b, t]
            raw[b, t] = next_adv
    np.testing.assert_allclose(returns, (raw + values) * mask, atol=1e-6)
    picked = raw[mask > 0]
    np.testing.assert_allclose(adv[mask > 0], (picked - picked.mean()) / picked.std(), atol=1e-4)
    assert np.all(adv[mask == 0] == 0)


def test_kl_penalty_and_score_land_where_they_should():
    logp_pol = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]], np.float32)
    logp_ref = np.array([[-1.5, -1.0, -0.5, 0.0], [-0.3, -0.2, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    rewards, k1, k3 = ro.shaped_rewards(np.array([2.0, -1.0]), logp_pol, logp_ref, mask, 0.1)
    expected = -0.1 * (logp_pol - logp_ref) * mask
    expected[0, 2] += 2.0
    expected[1, 1] += -1.0
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    np.testing.assert_allclose(k1, [0.5 - 1.0 + 0.0, 0.0 - 0.5], atol=1e-6)
    # The reference in float64: against NumPy's float32 exp, XLA's differs in
    # the last ulps (2.4e-7 of the 1e-6 on an AMD EPYC).
    d = (logp_ref.astype(np.float64) - logp_pol) * mask
    np.testing.assert_allclose(k3, ((np.exp(d) - 1 - d) * mask).sum(1), atol=1e-6)


def test_running_moments_and_score_processing():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, 7), rng.normal(-1, 0.5, 5)
    moments = ro.RunningMoments()
    moments.update(a)
    moments = ro.RunningMoments.from_state(json.loads(json.dumps(moments.state_dict())))
    eos = np.array([True, False, True, True, False])
    scores = ro.process_scores(b, eos, moments, normalize=True, eos_penalty=0.5, clip=1.5)
    both = np.concatenate([a, b])
    assert abs(moments.mean - both.mean()) < 1e-12 and abs(moments.std - both.std()) < 1e-12
    expected = np.clip((b - both.mean()) / both.std() - 0.5 * ~eos, -1.5, 1.5)
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    raw = ro.process_scores(b, eos, None, normalize=False, eos_penalty=0.0, clip=0.0)
    np.testing.assert_allclose(raw, b.astype(np.float32))


Sample = collections.namedtuple("Sample", "text tokens logprobs finish_reason")


def test_pack_rollout_layout():
    prompts = [ro.PolicyPrompt("a", "red_team", (Turn("user", "x"),), "x", (5, 6, 7)),
               ro.PolicyPrompt("b", "helpful", (Turn("user", "y"),), "y", (8,))]
    samples = [Sample("p", [11, 12], [-0.1, -0.2], "eos"),
               Sample("q", [13, 14, 15, 16], [-1.0, -2.0, -3.0, -4.0], "length")]
    r = ro.pack_rollout(prompts, samples, prompt_width=4, answer_width=4, pad_id=0)
    np.testing.assert_array_equal(r.tokens, [[0, 5, 6, 7, 11, 12, 0, 0], [0, 0, 0, 8, 13, 14, 15, 16]])
    np.testing.assert_array_equal(r.attention_mask, [[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(r.action_mask, [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(r.sampler_logp, [[-0.1, -0.2, 0, 0], [-1, -2, -3, -4]])
    np.testing.assert_array_equal(r.ended, [True, False])
    assert [list(t) for t in r.answer_tokens] == [[11, 12], [13, 14, 15, 16]]


def test_choose_prompts_mixes_by_fraction_and_is_seeded():
    red = [ro.PolicyPrompt(f"r{i}", "red_team", ()) for i in range(10)]
    helpful = [ro.PolicyPrompt(f"h{i}", "helpful", ()) for i in range(10)]
    picked = ro.choose_prompts(red, helpful, 8, 0.75, seed=1, iteration=3)
    assert sum(p.kind == "red_team" for p in picked) == 6
    assert len({p.id for p in picked}) == 8  # without replacement
    assert picked == ro.choose_prompts(red, helpful, 8, 0.75, seed=1, iteration=3)
    assert picked != ro.choose_prompts(red, helpful, 8, 0.75, seed=1, iteration=4)
    assert all(p.kind == "helpful" for p in ro.choose_prompts(red, helpful, 4, 0.0, 1, 0))


def test_sharded_update_matches_single_device():
    script = os.path.join(os.path.dirname(__file__), "scripts", "ppo_sharded.py")
    out = subprocess.run([sys.executable, script, "2x2x2"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["2x2x2"]["param_moved"] > 1e-5  # the update did something
    assert report["2x2x2"]["param_diff"] <= 1e-5, report
    assert report["2x2x2"]["clip_frac_diff"] < 1e-6


def test_prompt_pools_from_embedded_sets_and_hh_files(shared_data):
    import ml_collections
    hh = os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz")
    data = ml_collections.ConfigDict({"red_team": hh, "helpful": "embedded", "red_team_limit": 0,
                                      "helpful_limit": 5, "on_error": "skip"})
    train = ro.load_prompt_pool(data, "red_team", "train")
    test = ro.load_prompt_pool(data, "red_team", "test")
    assert not {p.id for p in train} & {p.id for p in test}
    # About 15% of the unique first turns are held out.
    assert 0.10 < len(test) / (len(train) + len(test)) < 0.20
    assert all(len(p.conversation) == 1 and p.conversation[0].role == "user" for p in test)
    helpful = ro.load_prompt_pool(data, "helpful", "train")
    assert len(helpful) == 5 and all(p.kind == "helpful" for p in helpful)
    data.red_team = "/nonexistent.jsonl"
    with pytest.raises(FileNotFoundError, match="config.data.red_team"):
        ro.load_prompt_pool(data, "red_team", "train")


def test_a_nonfinite_minibatch_is_skipped_within_the_budget(models):
    from cai_jax.errors import DivergenceError
    from cai_jax.training.trainer import NonfiniteBudget

    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    hyper = ppo_update.PPOHyper(clip_eps=0.2, value_clip_eps=0.2, entropy_coef=0.0, epochs=1,
                                minibatch_size=BATCH)
    built = ppo_update.build_ppo_steps(mesh=mesh, hyper=hyper, policy_config=POLICY_CFG,
                                       policy_optimizer=optax.sgd(LR), value_config=VALUE_CFG,
                                       value_optimizer=optax.sgd(LR), max_nonfinite_skips=1)
    policy, value = models
    batch = _batch(models)
    batch["advantages"] = np.full_like(batch["advantages"], np.nan)  # the policy loss only

    def update(budget):
        p_state, v_state = built.policy.init_state(policy), built.value.init_state(value)
        p_state, v_state, metrics = ppo_update.ppo_update(built, p_state, v_state, batch, jax.random.key(0),
                                                          where="ppo iteration 1", budget=budget)
        return jax.tree.map(np.asarray, p_state.params), jax.tree.map(np.asarray, v_state.params), metrics

    budget = NonfiniteBudget(1)
    p_params, v_params, metrics = update(budget)
    assert budget.used == 1 and metrics["skipped_nonfinite"] == 1.0
    for a, b in zip(jax.tree.leaves(p_params), jax.tree.leaves(policy)):
        np.testing.assert_array_equal(a, b)  # the skipped policy step changed nothing
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v_params), jax.tree.leaves(value)))
    assert np.isfinite(metrics["value_loss"])
    with pytest.raises(DivergenceError, match="ppo iteration 1, epoch 1, minibatch 1, policy: loss is nan"):
        update(NonfiniteBudget(0))
