"""The default run: the whole CAI recipe with Qwen2.5-Coder-0.5B-Instruct as the policy.

Sized to finish on a 2-core CPU in under 30 minutes, so every stage is small:
24 red-team and 24 helpful prompts with one critique-revision round, 160
answer pairs, 64 PPO rollouts (8 iterations of 8). The policy is a chat model
that answers in sentences and complies with about half of the red-team
prompts, so there is something for RL to move (SmolLM2-135M, the earlier
default, answers incoherently and did not move even under a perfect reward).
The preference model's labels are made by construction (RLCD) rather than by
the paper's multiple-choice judge: the policy answers 160 red-team training
prompts under the constitution's better and worse framings (decline and
redirect, against complying or against a bare refusal), because no offline
model judges well enough at this size. The preference models start from
SmolLM2-135M, which scores the policy's answers as text with its own
tokenizer. Half of the prompts' labels train PPO's reward model and the other
half a second preference model that evaluation judges harmlessness with
(pm_train.judge_fraction, stage defaults), so RL-CAI is not judged by its own
reward. The stage modules' own defaults (configs/base.py's
experiment_config, which this file starts from) follow the paper where it
gives a value (four revisions, T = 1 pairs, ...).
Where the time goes on this machine (seconds per stage) and what the run
shows are in experiments/results/default/README.md; configs/reproduce.py is the same recipe at the size
that runs here in under two hours.
Every field can be overridden with --config.a.b=value.
"""
import os

from cai_jax.config import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    config = _base.experiment_config()
    # The policy (see above); source "auto" loads the packaged weights.
    config.model.name = "qwen2.5-coder-0.5b"
    config.sampling.max_new_tokens = 80
    config.sampling.temperature = 0.7
    config.sampling.batch_size = 24

    # Prefilling long few-shot prompts is most of the cost of SL-CAI on a CPU.
    config.sl_generate.red_team_limit = 24
    config.sl_generate.helpful_limit = 24
    config.sl_generate.num_revisions = 1
    config.sl_generate.num_fewshot = 1
    config.sl_generate.critique_max_new_tokens = 64
    config.sl_train.num_epochs = 1.0
    config.sl_train.max_seq_len = 384
    config.sl_train.eval_fraction = 0.2
    config.sl_train.optimizer.learning_rate = 1e-5

    # Labels by construction: a chat model that follows the framings' system
    # messages answers under each (SmolLM2-135M answers alike under both).
    # Harmlessness pairs only: the helpful framings' pairs taught the PM to
    # prefer longer answers, which on HH-RLHF's harmless pairs is the wrong way.
    config.pairs.mode = "contrastive"
    config.pairs.model_source = "base"  # the policy answers under both framings
    config.pairs.include_helpful = False
    config.pairs.red_team_limit = 160
    config.pairs.max_new_tokens = 48
    config.pairs.temperature = 0.7
    config.pairs.batch_size = 64
    config.feedback.source = "construction"

    # Used when feedback.source="multiple_choice" (the paper's judge).
    config.feedback.num_principles = 2
    config.feedback.num_exemplars = 1
    # One pass: more passes over these few pairs fit them better and HH-RLHF's
    # pairs worse (3 epochs: 0.545 against 0.590 after one).
    config.pm_train.num_epochs = 1.0
    config.pm_train.max_seq_len = 320
    config.pm_train.batch_size = 4
    config.pm_train.optimizer.learning_rate = 1e-4
    # The PM (and the judge PM) start from SmolLM2-135M: it scores answers as
    # text with its own tokenizer, so it can reward the Qwen policy; on
    # HH-RLHF's pairs it did better than a Qwen PM
    # (benchmarks/results/labels/README.md).
    config.pm_train.init_source = "smollm2"

    config.ppo.iterations = 8
    config.ppo.rollout_batch_size = 8
    # Red-team prompts only: the PM was trained on harmlessness pairs alone, so
    # on helpful prompts its score is noise for PPO to chase.
    config.ppo.red_team_fraction = 1.0
    # One trunk for policy and value: the update costs what one model's does,
    # which pays for two passes of four-answer minibatches per rollout (at
    # 1e-5 with one step per iteration the policy did not move: KL 0.1).
    config.ppo.share_trunk = True
    config.ppo.minibatch_size = 4
    config.ppo.epochs = 2
    # At 1e-5 the 0.5B policy's KL reached 19.8 nats (target 6) by iteration 5;
    # at 5e-6 it stayed at or under 5.2 and the held-out reward climbed as far.
    config.ppo.policy_optimizer.learning_rate = 5e-6
    config.ppo.value_optimizer.learning_rate = 5e-6
    # Beta may move 10% per iteration (Ziegler's rule, horizon in rollouts):
    # with the paper-scale horizon of 10,000 it stayed at 0.0999 while KL hit 70.
    config.ppo.kl.horizon = 16.0
    # Once the policy gave one refusal to every prompt (entropy 0.05, reward
    # spread 0.01), whitening blew that spread up to unit advantages and the
    # next update wrecked the policy (KL 17, entropy 2.3, 92% compliance).
    config.ppo.advantage_std_floor = 1.0
    config.ppo.max_prompt_tokens = 128
    config.ppo.max_new_tokens = 48
    config.ppo.save_every = 4
    # One resumable state on disk: with the 0.5B policy each is 6 GB (weights
    # and Adam's two moments).
    config.ppo.keep_checkpoints = 1
    # Held-out reward before and after (greedy answers, paired by prompt): more
    # prompts at two points tell a change from noise better than few at five.
    config.ppo.eval_every = 8
    config.ppo.eval_prompts = 24

    config.eval.red_team_limit = 16
    config.eval.helpful_limit = 16
    config.eval.sampling.max_new_tokens = 64
    config.eval.feedback_judge.num_principles = 1
    config.eval.feedback_judge.num_exemplars = 1
    config.eval.n_bootstrap = 200
    config.lock()
    return config
