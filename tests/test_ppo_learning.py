"""PPO end to end on the tiny model: a reward it can learn, KL exactly 0 while
policy = reference, resume equality, and the `ppo` stage on fake model dirs."""
import os
import types

import jax
import numpy as np
import pytest

from cai_jax import pipeline, sharding as shd
from cai_jax.config import load_config_module
from cai_jax.data.conversation import Turn
from cai_jax.eval import evaluate
from cai_jax.rl_cai import ppo, rollout as ro
from cai_jax.training.metrics import read_metrics
from cai_jax.weights.loader import load_model
from cai_jax.weights.model_dir import save_model_dir

base_config = load_config_module(
    os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")).base_config


def _section(**overrides):
    """A CI-sized `ppo` section."""
    c = ppo.get_default_config()
    c.update(dict(iterations=3, rollout_batch_size=8, minibatch_size=4, epochs=2,
                  max_prompt_tokens=64, max_new_tokens=8, sample_batch_size=8, save_every=1,
                  eval_every=2, eval_prompts=4, tensorboard=False))
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A work directory holding what earlier stages would leave: a tiny random
    `sl_cai` and a tiny `pm` with a random scalar head; and the config."""
    workdir = tmp_path_factory.mktemp("ppo_run")
    tiny = load_model("init:tiny", seed=0, to_device=False)
    save_model_dir(str(workdir / "models" / "sl_cai"), tiny.config, tiny.params, tiny.tokenizer)
    pm = load_model("init:tiny", {"heads": ("scalar",)}, seed=1, to_device=False)
    pm.params["scalar_head"]["kernel"] = np.random.default_rng(0).normal(
        0, 1.0, pm.params["scalar_head"]["kernel"].shape).astype(np.float32)
    save_model_dir(str(workdir / "models" / "pm"), pm.config, pm.params, pm.tokenizer)
    config = base_config()
    config.model.name = "tiny"
    config.data.red_team_limit = 24
    config.data.helpful_limit = 24
    config.ppo = _section()
    return workdir, config


@pytest.fixture(scope="module")
def stage_runner(fake_run):
    """The runner the stage builds (policy, reference, value model from the PM,
    PM reward), compiled once for the tests below."""
    workdir, config = fake_run
    return ppo.PPORunner(ppo.load_setup(config, str(workdir), shd.mesh_from_config(config)))


def _params(runner):
    policy, value = runner.final_states
    return jax.tree.map(np.asarray, (policy.params, value.params if value is not None else None))


def test_kl_is_zero_while_policy_is_the_reference(stage_runner, tmp_path):
    summary = stage_runner.run(str(tmp_path / "ppo"), str(tmp_path / "models"), progress=False,
                               stop_after=1)
    first = read_metrics(str(tmp_path / "ppo" / "metrics.jsonl"))[1]
    assert first["step"] == 1
    assert first["kl_k1"] == 0.0 and first["kl_k3"] == 0.0
    assert first["approx_kl_k3"] > 0.0  # the policy did move during the update
    assert first["logp_sampler_gap"] < 1e-3  # the sampler's log-probs agree with a full pass
    assert summary["first_reward"] == first["reward_mean"]


def test_resumed_run_equals_unbroken_run(stage_runner, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    stage_runner.run(str(a / "ppo"), str(a / "models"), progress=False)
    unbroken = _params(stage_runner)
    stage_runner.run(str(b / "ppo"), str(b / "models"), progress=False, stop_after=2)
    resumed_summary = stage_runner.run(str(b / "ppo"), str(b / "models"), progress=False)
    resumed = _params(stage_runner)
    for x, y in zip(jax.tree.leaves(unbroken), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y)
    timing = ("rollout_seconds", "update_seconds", "rollout_tokens_per_s", "update_tokens_per_s")
    rows_a = read_metrics(str(a / "ppo" / "metrics.jsonl"))
    rows_b = read_metrics(str(b / "ppo" / "metrics.jsonl"))
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in timing} == \
            {k: v for k, v in rb.items() if k not in timing}
    assert resumed_summary["iterations"] == 3 and "eval_reward_last" in resumed_summary
    # Every iteration left a loadable policy (lm head) and value model (scalar head).
    for step in (1, 2, 3):
        assert load_model(f"ckpt:{b / 'models' / f'step_{step}'}").config.heads == ("lm",)
    value = load_model(f"ckpt:{b / 'models' / 'step_3' / 'value'}")
    assert value.config.heads == ("scalar",)
    np.testing.assert_array_equal(np.asarray(value.params["scalar_head"]["kernel"]),
                                  resumed[1]["scalar_head"]["kernel"])


def test_ppo_stage_end_to_end(fake_run):
    # Same shapes and config as `stage_runner`, so compilations come from the cache.
    workdir, config = fake_run
    rows = pipeline.run_pipeline(config, str(workdir), stages=["ppo"], progress=False)
    summary = rows[0]
    assert summary["iterations"] == 3
    assert np.isfinite(summary["first_reward"]) and np.isfinite(summary["eval_reward_last"])
    for step in (1, 2, 3):
        assert os.path.exists(workdir / "models" / "rl_cai" / f"step_{step}" / "model.json")
    assert os.path.exists(workdir / "models" / "rl_cai" / "step_3" / "value" / "model.json")
    assert len(read_metrics(str(workdir / "ppo" / "eval" / "step_3.jsonl"))) == 4
    again = pipeline.run_pipeline(config, str(workdir), stages=["ppo"], progress=False)
    assert again[0]["status"].startswith("skipped")
    # Eval takes exactly the checkpoints the stage recorded, not whatever step_K directories exist.
    os.makedirs(workdir / "models" / "rl_cai" / "step_99")
    eval_config = config.copy_and_resolve_references()
    eval_config.eval = evaluate.get_default_config()
    models = evaluate.find_models(eval_config, str(workdir))
    assert [(m.name, m.source) for m in models[2:]] == [
        (f"rl_cai/step_{s}", f"ckpt:{workdir}/models/rl_cai/step_{s}") for s in (1, 2, 3)]


# The learnable reward: how many answer tokens fall in a fixed eighth of a
# 512-token vocabulary. The random model hits it 1/8 of the time (1.5 of 12).
VOCAB, TARGET_LOW, TARGET_HIGH = 512, 16, 16 + 512 // 8


def target_count(rollout: ro.Rollout) -> np.ndarray:
    return np.array([np.sum((t >= TARGET_LOW) & (t < TARGET_HIGH)) for t in rollout.answer_tokens],
                    np.float32)


def test_ppo_raises_a_learnable_reward_with_bounded_kl(tmp_path):
    # Shared trunk (policy and value heads on one model), adaptive beta.
    section = _section(iterations=20, rollout_batch_size=16, minibatch_size=8, epochs=2,
                       max_prompt_tokens=8, max_new_tokens=12, sample_batch_size=16,
                       save_every=100, eval_every=0, reward_norm=False, reward_clip=0.0,
                       share_trunk=True)
    section.kl.update(dict(adaptive=True, init_beta=0.1, target=10.0, horizon=200.0))
    section.policy_optimizer.learning_rate = 1e-2
    tokenizer = load_model("init:tiny", to_device=False).tokenizer  # ids < 512 decode fine
    policy = load_model("init:tiny", {"vocab_size": VOCAB, "heads": ("lm", "scalar")}, seed=0,
                        to_device=False)
    rng = np.random.default_rng(0)
    prompts = [ro.PolicyPrompt(f"p{i}", "red_team", (Turn("user", "-"),), "-",
                               tuple(int(t) for t in rng.integers(3, VOCAB, rng.integers(3, 9))))
               for i in range(24)]
    setup = ppo.PPOSetup(
        section=section, seed=0, mesh=shd.make_mesh({"data": 1}, jax.devices()[:1]),
        tokenizer=tokenizer, policy_config=policy.config, policy_params=policy.params,
        value_config=None, value_params=None, reward_fn=target_count, train_red_team=prompts,
        train_helpful=[], eval_prompts=[])
    ppo.PPORunner(setup).run(str(tmp_path / "ppo"), str(tmp_path / "models"), progress=False)
    rows = read_metrics(str(tmp_path / "ppo" / "metrics.jsonl"))
    rewards = [r["reward_mean"] for r in rows]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 2.5, rewards
    assert last > first + 3.0, rewards
    # Collapsing onto one token would cost 12 * log(512) = 75 nats per answer.
    assert max(r["kl_k1"] for r in rows) < 50.0, [r["kl_k1"] for r in rows]
    # beta follows Ziegler et al.'s rule on the logged KL, and the KL went over target.
    beta = 0.1
    for row in rows:
        assert abs(row["beta"] - beta) <= 1e-5 * beta
        beta *= 1 + np.clip(row["kl_k1"] / 10.0 - 1, -0.2, 0.2) * 16 / 200.0
    assert rows[-1]["beta"] > 0.1


def test_pm_with_another_vocabulary_rewards_the_policy_as_text(fake_run, tmp_path):
    # A PM with a 512-token vocabulary, not the policy's (as SmolLM2's PM
    # rewards the Qwen policy): it reads the answers' text with its own tokenizer.
    workdir, config = fake_run
    pm = load_model("init:tiny", {"heads": ("scalar",), "vocab_size": 512}, seed=2, to_device=False)
    pm.params["scalar_head"]["kernel"] = np.random.default_rng(1).normal(
        0, 1.0, pm.params["scalar_head"]["kernel"].shape).astype(np.float32)
    tokenizer = load_model("init:tiny", to_device=False).tokenizer  # its ids fit both vocabularies
    save_model_dir(str(tmp_path / "pm512"), pm.config, pm.params, tokenizer)
    other = config.copy_and_resolve_references()
    other.ppo.preference_model = f"ckpt:{tmp_path / 'pm512'}"
    other.ppo.share_trunk = True
    setup = ppo.load_setup(other, str(workdir), shd.mesh_from_config(other))
    assert setup.reward_fn.scorer.config.vocab_size == 512 != setup.policy_config.vocab_size
    prompts = setup.train_red_team[:2]
    # The reward reads only the prompts and the answers' text.
    rollout = types.SimpleNamespace(prompts=prompts,
                                    answers=["Sure, here it is.", "I can't help with that."])
    scores = setup.reward_fn(rollout)
    expected = setup.reward_fn.scorer.score([p.conversation for p in prompts], rollout.answers)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores[0] != scores[1]
    # A value model started from that PM would read the policy's tokens: refused.
    other.ppo.share_trunk = False
    other.ppo.value_init = "pm"
    with pytest.raises(ValueError, match=r"value_init='pm'.*vocabulary \(512\).*policy's \(\d+\)"):
        ppo.load_setup(other, str(workdir), shd.mesh_from_config(other))
