"""The default run: the whole CAI recipe on the bundled SmolLM2-135M-Instruct.

Sized to finish on a 2-core CPU in about 20 minutes, so every stage is small:
24 red-team and 24 helpful prompts with one critique-revision round, 32 answer
pairs, a few hundred PPO rollouts. That shows every stage working on a real
model, not the paper's effect sizes; configs/paper.py is the paper-shaped run.
Where the time goes on this machine (seconds per stage) is in README.md.
Every field can be overridden with --config.a.b=value.
"""
import os

from cai_jax.config import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    config = _base.experiment_config()
    config.data.red_team_limit = 24
    config.data.helpful_limit = 24
    config.sampling.max_new_tokens = 96
    # A 135M model rambles at temperature 1; 0.7 keeps answers and revisions readable.
    config.sampling.temperature = 0.7

    # Prefilling long few-shot prompts is most of the cost of SL-CAI on a CPU.
    config.sl_generate.num_revisions = 1
    config.sl_generate.num_fewshot = 1
    config.sl_generate.critique_max_new_tokens = 64
    config.sl_train.num_epochs = 1.0
    config.sl_train.max_seq_len = 384
    config.sl_train.eval_fraction = 0.2
    config.sl_train.optimizer.learning_rate = 3e-5

    config.pairs.red_team_limit = 16
    config.pairs.helpful_limit = 16
    config.pairs.max_new_tokens = 64

    config.feedback.num_principles = 2
    config.feedback.num_exemplars = 1
    # Labels from a 135M feedback model sit close to 0.5, so the PM needs a
    # larger step than the paper's to separate answers in a few dozen updates.
    config.pm_train.num_epochs = 2.0
    config.pm_train.max_seq_len = 320
    config.pm_train.batch_size = 4
    config.pm_train.optimizer.learning_rate = 1e-4

    config.ppo.iterations = 8
    config.ppo.rollout_batch_size = 8
    config.ppo.minibatch_size = 8
    config.ppo.epochs = 1
    config.ppo.max_prompt_tokens = 128
    config.ppo.max_new_tokens = 48
    config.ppo.save_every = 4
    config.ppo.eval_every = 2
    config.ppo.eval_prompts = 8
    config.ppo.policy_optimizer.learning_rate = 1e-5
    config.ppo.value_optimizer.learning_rate = 1e-5

    config.eval.red_team_limit = 16
    config.eval.helpful_limit = 16
    config.eval.sampling.max_new_tokens = 64
    config.eval.feedback_judge.num_principles = 1
    config.eval.feedback_judge.num_exemplars = 1
    config.eval.n_bootstrap = 200
    config.lock()
    return config
