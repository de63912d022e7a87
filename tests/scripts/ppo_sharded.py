"""Runs one PPO update (2 epochs of shuffled minibatches, policy and value) of the
tiny model on fixed rollout data, on several meshes of 8 CPU devices, and prints
the max parameter difference to the single-device run as JSON. Started by
tests/test_ppo.py in a subprocess: the device count must be set before JAX
initialises."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax import sharding as shd  # noqa: E402
from cai_jax.models.config import model_config_from_dict  # noqa: E402
from cai_jax.models.transformer import Transformer, init_params  # noqa: E402
from cai_jax.rl_cai import ppo_update  # noqa: E402

OPT = dict(learning_rate=1e-4, warmup_steps=0, total_steps=1, schedule="constant",
           grad_clip_norm=1.0, weight_decay=0.0)


def rollout_batch(policy_cfg, policy_params, batch=16, prompt=6, answer=8):
    """Random prompt+answer rows with real log-probs of the policy (perturbed, so
    ratios differ from 1 and clipping happens), random advantages and returns."""
    rng = np.random.default_rng(0)
    t = prompt + answer
    prompt_len = rng.integers(2, prompt + 1, batch)
    answer_len = rng.integers(1, answer + 1, batch)
    cols = np.arange(t)[None]
    attention = ((cols >= prompt - prompt_len[:, None]) & (cols < prompt + answer_len[:, None]))
    tokens = rng.integers(0, policy_cfg.vocab_size, (batch, t)).astype(np.int32) * attention
    action = (np.arange(answer)[None] < answer_len[:, None]).astype(np.float32)
    out = jax.jit(lambda p, tok, am: ppo_update.answer_outputs(Transformer(policy_cfg), p, tok, am,
                                                               answer))(policy_params, tokens,
                                                                        attention.astype(np.int32))
    logp = np.asarray(out["logp"]) + rng.normal(0, 0.3, (batch, answer)).astype(np.float32)
    return {"tokens": tokens, "attention_mask": attention.astype(np.int32), "action_mask": action,
            "logp_old": logp * action,
            "values_old": rng.normal(0, 1, (batch, answer)).astype(np.float32) * action,
            "advantages": rng.normal(0, 1, (batch, answer)).astype(np.float32) * action,
            "returns": rng.normal(0, 1, (batch, answer)).astype(np.float32) * action}


def main(mesh_shapes):
    policy_cfg = model_config_from_dict({"name": "tiny", "vocab_size": 512})
    value_cfg = policy_cfg.replace(heads=("scalar",))
    policy0 = jax.tree.map(np.asarray, init_params(policy_cfg, jax.random.key(0)))
    value0 = jax.tree.map(np.asarray, init_params(value_cfg, jax.random.key(1)))
    batch = rollout_batch(policy_cfg, policy0)
    hyper = ppo_update.PPOHyper(clip_eps=0.2, value_clip_eps=0.2, entropy_coef=0.01, epochs=2,
                                minibatch_size=8, grad_accum_steps=2)
    results = {}
    for shape in [(1, 1, 1)] + mesh_shapes:
        devices = jax.devices()[:int(np.prod(shape))]
        mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices)
        steps = ppo_update.build_ppo_steps(mesh=mesh, hyper=hyper, policy_config=policy_cfg,
                                           policy_optimizer=OPT, value_config=value_cfg,
                                           value_optimizer=OPT)
        policy = steps.policy.init_state(policy0)
        value = steps.value.init_state(value0)
        policy, value, metrics = ppo_update.ppo_update(steps, policy, value, batch,
                                                       jax.random.key(3))
        results[shape] = (jax.tree.map(np.asarray, policy.params),
                          jax.tree.map(np.asarray, value.params), metrics)
    base_policy, base_value, base_metrics = results[(1, 1, 1)]
    report = {}
    for shape, (policy, value, metrics) in results.items():
        diff = max(float(np.abs(a - b).max()) for a, b in
                   zip(jax.tree.leaves((base_policy, base_value)), jax.tree.leaves((policy, value))))
        moved = max(float(np.abs(a - b).max()) for a, b in
                    zip(jax.tree.leaves((policy0, value0)), jax.tree.leaves((policy, value))))
        report["x".join(map(str, shape))] = {
            "param_diff": diff, "param_moved": moved,
            "clip_frac_diff": abs(metrics["clip_frac"] - base_metrics["clip_frac"]),
            "value_loss_diff": abs(metrics["value_loss"] - base_metrics["value_loss"])}
    print(json.dumps(report))


if __name__ == "__main__":
    shapes = [tuple(int(x) for x in s.split("x")) for s in sys.argv[1:]] or [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
    main(shapes)
