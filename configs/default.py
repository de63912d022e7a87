"""The default run: the whole CAI recipe on the bundled SmolLM2-135M-Instruct.

Sized to finish on a 2-core CPU in about 20 minutes: fewer prompts, revisions,
pairs and PPO iterations than the paper (see configs/paper.py for the
paper-shaped run). Every field can be overridden with --config.a.b=value.
"""
import os

from cai_jax.config import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    config = _base.experiment_config()
    config.data.red_team_limit = 48
    config.data.helpful_limit = 48
    config.sampling.max_new_tokens = 96

    config.sl_generate.num_revisions = 2
    config.sl_generate.num_fewshot = 1  # prefill of few-shot context is most of the cost
    config.sl_train.num_epochs = 2.0

    config.pairs.red_team_limit = 32
    config.pairs.helpful_limit = 32

    config.feedback.num_principles = 2
    config.feedback.num_exemplars = 1
    config.pm_train.num_epochs = 2.0

    config.ppo.iterations = 8
    config.ppo.rollout_batch_size = 16
    config.ppo.minibatch_size = 8
    config.ppo.epochs = 2
    config.ppo.max_new_tokens = 64
    config.ppo.save_every = 2
    config.ppo.eval_every = 2
    config.ppo.eval_prompts = 16

    config.eval.red_team_limit = 24
    config.eval.helpful_limit = 24
    config.eval.sampling.max_new_tokens = 96
    config.eval.n_bootstrap = 200
    config.lock()
    return config
