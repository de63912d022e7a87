"""A seconds-to-minutes run of every stage on the random `tiny` model: the
pipeline's plumbing, not its results. CI runs it (tests/test_pipeline.py)."""
import os

from cai_jax.config import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    config = _base.experiment_config()
    config.model.name = "tiny"
    config.data.red_team_limit = 4
    config.data.helpful_limit = 4
    config.data.render = "hh"
    config.sampling.max_new_tokens = 8
    config.sampling.batch_size = 4

    config.sl_generate.num_revisions = 1
    config.sl_generate.num_fewshot = 1
    config.sl_train.num_steps = 2
    config.sl_train.batch_size = 2
    config.sl_train.eval_every = 2
    config.sl_train.max_seq_len = 1024

    config.pairs.red_team_limit = 3
    config.pairs.helpful_limit = 2
    config.feedback.num_principles = 1
    config.feedback.num_exemplars = 0
    config.feedback.batch_size = 4
    config.pm_train.num_steps = 2
    config.pm_train.batch_size = 2
    config.pm_train.eval_every = 2

    config.ppo.iterations = 2
    config.ppo.rollout_batch_size = 4
    config.ppo.minibatch_size = 2
    config.ppo.epochs = 1
    config.ppo.max_prompt_tokens = 64
    config.ppo.max_new_tokens = 8
    config.ppo.sample_batch_size = 4
    config.ppo.save_every = 1
    config.ppo.eval_every = 2
    config.ppo.eval_prompts = 2
    config.ppo.tensorboard = False

    config.eval.red_team_limit = 2
    config.eval.helpful_limit = 2
    config.eval.sampling.max_new_tokens = 6
    config.eval.sampling.batch_size = 4
    config.eval.n_bootstrap = 20
    config.eval.helpful_judge = "pm"
    config.lock()
    return config
