"""The recipe at the largest size this project's reference machine (2 CPU
cores, no accelerator) runs in under two hours: the default run grown where
the paper's effects need room.

- SL-CAI: 32 red-team prompts through the paper's four critique-revision
  rounds (figure 5 scores each round), plus 32 helpful answers. Each round
  prefills the whole growing transcript, so SL-CAI's generation took 35
  minutes here (2,088 s, partly beside other work): 64 prompts would take
  most of the two hours.
- Labels by construction on all 200 red-team training prompts; half train
  PPO's reward model, half the independent judge PM (as in the default).
- PPO: 32 iterations of 8 rollouts (four times the default), a policy saved
  every 8 so figure 2 has four RL-CAI points, held-out reward on all 38
  test-split red-team prompts at each save.
- Evaluation on every held-out prompt (38 red-team, 42 helpful).

Everything else (models, learning rates, the label source) is the default's,
so the two runs differ only in size. Its wall time and results are in
experiments/results/reproduce/README.md; they were measured with the earlier default
policy, SmolLM2-135M. With the Qwen2.5-Coder-0.5B policy (about 4x the cost
per token) it has not been run yet and may not fit two hours. Run it with
    python -m cai_jax.main --config=configs/reproduce.py --workdir=runs/reproduce
"""
import os

from cai_jax.config import load_config_module

_default = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config():
    # The default is locked: fields can be changed, none added.
    config = _default.get_config()

    config.sl_generate.red_team_limit = 32
    config.sl_generate.helpful_limit = 32
    config.sl_generate.num_revisions = 4  # the paper's number

    config.pairs.red_team_limit = 0  # all 200 training prompts

    config.ppo.iterations = 32
    config.ppo.save_every = 8
    config.ppo.eval_every = 8
    config.ppo.eval_prompts = 0  # all held-out red-team prompts

    config.eval.red_team_limit = 0  # all held-out prompts
    config.eval.helpful_limit = 0
    config.eval.n_bootstrap = 1000
    return config
