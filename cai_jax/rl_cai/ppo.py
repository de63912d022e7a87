"""RL-CAI: PPO against the preference model, with a KL penalty to the SL-CAI model.

The stage `ppo` loads four models: the policy (SL-CAI weights, trained), the
reference (the same weights, frozen, optionally bfloat16), the preference model
(frozen) and a value model (a separate trunk with a scalar head initialised from
the PM or the policy, or the policy's own trunk with a second head when
`ppo.share_trunk`). Each iteration:

    rollout   prompts -> sampler(policy params) -> answers
              one forward pass each: policy and reference log-probs, values
    reward    PM score on the last answer token (normalised, clipped, minus an
              optional penalty when the answer hit max_new_tokens) and
              -beta * (log pi - log pi_ref) on every answer token
    update    GAE, whitened advantages, `epochs` passes of shuffled minibatch
              steps of the clipped policy and value losses (ppo_update.py)
    control   beta follows the observed KL (Ziegler et al. 2019) or stays fixed

Outputs: `<workdir>/ppo/metrics.jsonl` (+ TensorBoard), held-out evaluation
answers `<workdir>/ppo/eval/step_K.jsonl`, policy checkpoints
`<workdir>/models/rl_cai/step_K/` (ckpt: dirs, value model in `value/`), listed
in `<workdir>/models/rl_cai/checkpoints.json` as each is saved, and a
resumable state in `<workdir>/ppo/ckpt`. Everything random is a function of
(seed, iteration), so a resumed run ends exactly where an unbroken one does.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cai_jax import artifacts, host_memory, processes, sharding as shd, stats, storage
from cai_jax.config import optimizer_section
from cai_jax.data.conversation import answer_stop_strings
from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import Transformer
from cai_jax.rl_cai import ppo_math, ppo_update, rollout as ro
from cai_jax.training.checkpoint import Checkpointer
from cai_jax.training.metrics import MetricWriter, read_metrics
from cai_jax.training.trainer import NonfiniteBudget, restore_or_init
from cai_jax.weights.tokenizer import pad_token_id


def get_default_config() -> ml_collections.ConfigDict:
    """The `ppo` section. CI-sized runs override iterations, rollout_batch_size,
    minibatch_size, max_new_tokens, eval_prompts and save_every/eval_every."""
    c = ml_collections.ConfigDict()
    # Model references (cai_jax/model_ref.py): the run's "sl_cai" and "pm", or
    # any other ("init:tiny", "ckpt:/abs", a packaged model, ...).
    c.policy = "sl_cai"
    c.preference_model = "pm"
    c.value_init = "pm"  # "pm" | "policy": where the value trunk starts
    c.share_trunk = False  # one trunk with lm + scalar heads for policy and value
    c.dtype = "float32"  # compute dtype of policy and value
    c.ref_dtype = "float32"  # the frozen reference (bfloat16 halves its memory)
    c.pm_dtype = "float32"

    c.iterations = 100
    c.rollout_batch_size = 32  # prompts (= answers) per iteration
    c.red_team_fraction = 0.5  # the rest are helpful prompts
    c.max_prompt_tokens = 256  # longer prompts are dropped
    c.max_new_tokens = 96
    c.temperature = 1.0  # policy logits are divided by it everywhere, so PPO stays on-policy
    c.top_k = 0
    c.top_p = 1.0
    c.sample_batch_size = 32
    # Recompute rollout log-probs with a full forward pass (the same function the
    # update uses) instead of taking the sampler's, so the first ratio is exactly 1.
    c.recompute_logprobs = True

    c.kl = ml_collections.ConfigDict({"adaptive": True, "init_beta": 0.1, "target": 6.0,
                                      "horizon": 10000.0})
    c.gamma = 1.0
    c.lam = 0.95
    c.clip_eps = 0.2
    c.value_clip_eps = 0.2
    c.entropy_coef = 0.0
    c.value_coef = 0.5  # weight of the value loss when share_trunk
    c.whiten_advantages = True
    # Whitening divides the advantages by at least this. 0: plain whitening.
    # With reward_norm the rewards are in units of the PM scores' running
    # spread, so 1.0 keeps a batch of near-identical answers from being
    # scaled up to a full-size step (ppo_math.whiten).
    c.advantage_std_floor = 0.0
    c.epochs = 4
    c.minibatch_size = 8
    c.grad_accum_steps = 1
    c.policy_optimizer = optimizer_section(learning_rate=1e-6, total_steps=1, warmup_steps=0,
                                           schedule="constant")
    c.value_optimizer = optimizer_section(learning_rate=1e-5, total_steps=1, warmup_steps=0,
                                          schedule="constant")

    c.reward_norm = True  # running mean/std of PM scores
    c.reward_clip = 5.0  # after normalisation; 0 = no clip
    c.eos_penalty = 0.0  # subtracted from the score of answers cut off at max_new_tokens

    # Non-finite minibatch updates skipped (parameters kept) before the stage
    # stops; 0: the first one stops it.
    c.max_nonfinite_skips = 0
    c.save_every = 20  # policy model dirs and the resumable state
    c.keep_checkpoints = 2
    c.eval_every = 10  # held-out red-team prompts; 0 = never
    c.eval_prompts = 32  # 0 = all test-split red-team prompts
    c.eval_temperature = 0.0  # 0 = greedy
    c.tensorboard = True
    return c


# ------------------------------------------------------------------ setup

def _head_view(params: dict, heads) -> dict:
    """The parameters a model with `heads` uses (a dict view, no copies)."""
    drop = set()
    if "scalar" not in heads:
        drop.add("scalar_head")
    if "lm" not in heads:
        drop.add("lm_head")
    return {k: v for k, v in params.items() if k not in drop}


def _cast(params, dtype):
    # copy=False: a float32 reference of a float32 policy is placed straight
    # from the host arrays, not from a second 2 GB copy of a 0.5B model.
    return jax.tree.map(lambda x: processes.to_host(x).astype(dtype, copy=False), params)


@dataclasses.dataclass
class PPOSetup:
    """Everything one PPO run is built from. `run_stage` loads it from the work
    directory; tests assemble it from tiny models and their own reward function."""

    section: ml_collections.ConfigDict  # config.ppo
    seed: int
    mesh: Any
    tokenizer: Any
    policy_config: TransformerConfig  # heads ("lm",), or ("lm", "scalar") with a shared trunk
    policy_params: dict  # host (NumPy) parameters
    value_config: Optional[TransformerConfig]  # None with a shared trunk
    value_params: Optional[dict]
    reward_fn: ro.RewardFn
    train_red_team: list  # encoded PolicyPrompts
    train_helpful: list
    eval_prompts: list
    render: str = "chat"  # how prompts were rendered ("hh" adds the HH stop string)
    ref_config: Optional[TransformerConfig] = None  # default: policy config, heads ("lm",)
    shared_prefix: bool = False  # rollouts compute the prompts' shared start once (config.sampling)


def hyper_from_config(c) -> ppo_update.PPOHyper:
    return ppo_update.PPOHyper(
        clip_eps=c.clip_eps, value_clip_eps=c.value_clip_eps, entropy_coef=c.entropy_coef,
        value_coef=c.value_coef, temperature=c.temperature, gamma=c.gamma, lam=c.lam,
        whiten_advantages=c.whiten_advantages, advantage_std_floor=c.advantage_std_floor,
        epochs=c.epochs, minibatch_size=c.minibatch_size,
        grad_accum_steps=c.grad_accum_steps)


def kl_controller(kl_cfg):
    if kl_cfg.adaptive:
        return ppo_math.AdaptiveKLController(kl_cfg.init_beta, kl_cfg.target, kl_cfg.horizon)
    return ppo_math.FixedKLController(kl_cfg.init_beta)


def check_config(c, mesh):
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.rollout_batch_size % c.minibatch_size:
        raise ValueError(f"config.ppo.rollout_batch_size ({c.rollout_batch_size}) must be a "
                         f"multiple of config.ppo.minibatch_size ({c.minibatch_size})")
    for key in ("rollout_batch_size", "minibatch_size"):
        if c[key] % batch_devices:
            raise ValueError(f"config.ppo.{key} ({c[key]}) must be a multiple of the "
                             f"{batch_devices} devices on the mesh's data and fsdp axes")
    if (c.minibatch_size // batch_devices) % c.grad_accum_steps:
        raise ValueError(f"config.ppo.minibatch_size per device must be divisible by "
                         f"config.ppo.grad_accum_steps ({c.grad_accum_steps})")
    if not c.recompute_logprobs and (c.temperature != 1.0 or c.top_k or c.top_p < 1.0):
        raise ValueError("config.ppo.recompute_logprobs=False takes the sampler's log-probs, which "
                         "are before temperature/top-k/top-p; with temperature != 1 or a filter "
                         "the importance ratio would be wrong: recompute them")
    if c.value_init not in ("pm", "policy"):
        raise ValueError(f"config.ppo.value_init is {c.value_init!r}; one of 'pm', 'policy'")


def model_overrides(c) -> dict[str, dict]:
    """The runtime fields of the four PPO models, from config.ppo: load_setup
    loads them so, and tools.aot builds their configs from config.model so."""
    return {
        "policy": {"heads": ("lm", "scalar") if c.share_trunk else ("lm",), "dtype": c.dtype},
        "value": {"heads": ("scalar",), "dtype": c.dtype},
        # The frozen reference: the policy's starting weights, LM head only.
        "reference": {"heads": ("lm",), "dtype": c.ref_dtype, "param_dtype": c.ref_dtype},
        "preference_model": {"heads": ("scalar",), "dtype": c.pm_dtype, "param_dtype": c.pm_dtype},
    }


def optimizer_steps(c) -> int:
    """Optimizer steps of a whole run: what the policy and value schedules are fitted to."""
    return c.iterations * c.epochs * (c.rollout_batch_size // c.minibatch_size)


@dataclasses.dataclass
class PPOPrograms:
    """What one PPO run compiles besides the sampler: the policy and value
    trainers (training/trainer.py), the frozen reference's config and the
    rollout scorer. PPORunner runs them; tools.aot compiles them."""

    steps: ppo_update.PPOSteps
    ref_config: TransformerConfig
    scorer: Callable


def build_programs(c, mesh, policy_config: TransformerConfig,
                   value_config: Optional[TransformerConfig],
                   ref_config: Optional[TransformerConfig] = None) -> PPOPrograms:
    """The programs of a `ppo` section for these models (no value config: a
    shared trunk, the policy's scalar head gives the values)."""
    ref_config = ref_config or policy_config.replace(**model_overrides(c)["reference"])
    steps = ppo_update.build_ppo_steps(
        mesh=mesh, hyper=hyper_from_config(c), policy_config=policy_config,
        policy_optimizer=c.policy_optimizer, value_config=value_config,
        value_optimizer=c.value_optimizer, num_steps=optimizer_steps(c),
        max_nonfinite_skips=c.max_nonfinite_skips)
    scorer = ro.build_rollout_scorer(steps.policy.model, Transformer(ref_config),
                                     steps.value.model if steps.value is not None else None,
                                     c.temperature)
    return PPOPrograms(steps, ref_config, scorer)


# ----------------------------------------------------------------- runner

class PPORunner:
    """Compiles the pieces of one setup once; `run()` can then be called
    repeatedly (tests resume and compare runs without recompiling)."""

    def __init__(self, setup: PPOSetup):
        from cai_jax.inference.sampling import Sampler

        c = setup.section
        check_config(c, setup.mesh)
        self.setup, self.c, self.mesh = setup, c, setup.mesh
        self.shared = setup.value_config is None
        self.controller = kl_controller(c.kl)
        programs = build_programs(c, self.mesh, setup.policy_config, setup.value_config,
                                  setup.ref_config)
        self.steps, self.scorer, self.hyper = programs.steps, programs.scorer, programs.steps.hyper
        # Non-finite updates skipped so far (run() restores it from the checkpoint).
        self.nonfinite = NonfiniteBudget(c.max_nonfinite_skips)
        ref_config = programs.ref_config
        ref_params = _cast(_head_view(setup.policy_params, ("lm",)), ref_config.weight_dtype)
        self.ref_params = shd.place(ref_params, shd.param_shardings(ref_config, self.mesh))
        self.sample_config = setup.policy_config.replace(heads=("lm",))
        self.sampler = Sampler(self.sample_config, setup.tokenizer, mesh=self.mesh,
                               shared_prefix=setup.shared_prefix)
        self.data_sharding = shd.data_sharding(self.mesh, 2)
        self.pad_id = pad_token_id(setup.tokenizer)

    # -- pieces of an iteration

    def _sampling_params(self, temperature):
        from cai_jax.inference.sampling import SamplingParams
        # In the HH rendering the model would go on to write the next
        # "Human:" turn itself; the answer ends before it.
        return SamplingParams(temperature=temperature, top_k=self.c.top_k, top_p=self.c.top_p,
                              max_new_tokens=self.c.max_new_tokens,
                              stop_strings=answer_stop_strings(self.setup.render))

    def _generate(self, policy_params, prompts, temperature, seed, tag) -> ro.Rollout:
        # Example ids unique per row: a prompt drawn twice gets two answers.
        samples = self.sampler.generate(
            _head_view(policy_params, ("lm",)), [list(p.tokens) for p in prompts],
            self._sampling_params(temperature), seed=seed,
            example_ids=[f"{tag}:{i}:{p.id}" for i, p in enumerate(prompts)],
            batch_size=self.c.sample_batch_size, progress=False)
        return ro.pack_rollout(prompts, samples, self._prompt_width(prompts),
                               self.c.max_new_tokens, self.pad_id)

    def _prompt_width(self, prompts) -> int:
        """The longest prompt rounded up to a power of two (at least 16, at most
        max_prompt_tokens): little padding, and only a few shapes to compile."""
        longest = max(len(p.tokens) for p in prompts)
        return min(max(16, 1 << (longest - 1).bit_length()), self.c.max_prompt_tokens)

    def initial_states(self):
        if self.setup.policy_params is None:
            raise RuntimeError("PPORunner.run(release_host_params=True) dropped the starting weights; "
                               "build a new runner to start afresh")
        policy_state = self.steps.policy.init_state(self.setup.policy_params)
        value_state = None if self.shared else self.steps.value.init_state(self.setup.value_params)
        return policy_state, value_state

    def iteration(self, it: int, policy_state, value_state, beta: float,
                  moments: ro.RunningMoments, key):
        """One rollout + update. Returns (policy_state, value_state, new beta, metrics)."""
        c, s = self.c, self.setup
        start = time.perf_counter()
        prompts = ro.choose_prompts(s.train_red_team, s.train_helpful, c.rollout_batch_size,
                                    c.red_team_fraction, s.seed, it)
        rollout = self._generate(policy_state.params, prompts, c.temperature,
                                 ro.sampler_seed(s.seed, it), "train")
        sample_seconds = time.perf_counter() - start

        put = lambda x: jax.device_put(x, self.data_sharding)  # noqa: E731
        value_params = None if self.shared else value_state.params
        scored = self.scorer(policy_state.params, self.ref_params, value_params,
                             put(rollout.tokens), put(rollout.attention_mask),
                             put(rollout.action_mask))
        scored = {k: processes.to_host(v) for k, v in scored.items()}
        mask = rollout.action_mask
        raw = np.asarray(s.reward_fn(rollout), np.float32)
        if raw.shape != (len(prompts),):
            raise ValueError(f"reward function returned shape {raw.shape}, expected ({len(prompts)},)")
        scores = ro.process_scores(raw, rollout.ended, moments, normalize=c.reward_norm,
                                   eos_penalty=c.eos_penalty, clip=c.reward_clip)
        logp_old = scored["logp_policy"] if c.recompute_logprobs else rollout.sampler_logp
        rewards, kl_k1, kl_k3 = ro.shaped_rewards(scores, logp_old, scored["logp_ref"], mask, beta)
        advantages, returns = ppo_update.compute_advantages(rewards, scored["values"], mask,
                                                            self.hyper)
        rollout_seconds = time.perf_counter() - start

        batch = {"tokens": rollout.tokens, "attention_mask": rollout.attention_mask,
                 "action_mask": mask, "logp_old": logp_old, "values_old": scored["values"],
                 "advantages": advantages, "returns": returns}
        update_start = time.perf_counter()
        policy_state, value_state, update_metrics = ppo_update.ppo_update(
            self.steps, policy_state, value_state, batch, jax.random.fold_in(key, it),
            where=f"ppo iteration {it + 1}", budget=self.nonfinite)
        update_seconds = time.perf_counter() - update_start
        new_beta = float(self.controller.update(np.float32(beta), np.float32(kl_k1.mean()),
                                                len(prompts)))

        tokens = mask.sum()
        metrics = {
            "reward_mean": float(raw.mean()), "reward_std": float(raw.std()),
            "score_mean": float(scores.mean()),
            "kl_k1": float(kl_k1.mean()), "kl_k3": float(kl_k3.mean()),
            "entropy": float(scored["entropy"].sum() / max(tokens, 1)),
            "explained_variance": float(ppo_math.explained_variance(
                scored["values"], returns, mask)),
            "answer_length": float(mask.sum(1).mean()),
            "eos_fraction": float(rollout.ended.mean()),
            "beta": float(beta),
            "logp_sampler_gap": float(np.abs((rollout.sampler_logp - scored["logp_policy"])
                                             * mask).max()),
            "rollout_tokens_per_s": float(tokens / max(sample_seconds, 1e-9)),
            "update_tokens_per_s": float(rollout.attention_mask.sum() * c.epochs
                                         / max(update_seconds, 1e-9)),
            "rollout_seconds": rollout_seconds, "update_seconds": update_seconds,
            **update_metrics,
        }
        return policy_state, value_state, new_beta, metrics

    def evaluate(self, policy_params, it: int) -> tuple[dict, list[dict]]:
        """Mean reward of answers to the held-out red-team prompts."""
        prompts = self.setup.eval_prompts
        rollout = self._generate(policy_params, prompts, self.c.eval_temperature,
                                 ro.sampler_seed(self.setup.seed, it, 1), "eval")
        raw = np.asarray(self.setup.reward_fn(rollout), np.float32)
        records = [{"id": p.id, "prompt": p.text, "answer": a, "reward": float(r),
                    "ended": bool(e)}
                   for p, a, r, e in zip(prompts, rollout.answers, raw, rollout.ended)]
        return {"eval_reward": float(raw.mean()), "eval_reward_std": float(raw.std()),
                "eval_answer_length": float(rollout.answer_lengths.mean()),
                "eval_eos_fraction": float(rollout.ended.mean())}, records

    # -- saving

    def save_models(self, models_dir: str, done: int, policy_state, value_state) -> None:
        """The policy at `done` iterations as a model directory (what eval
        reads); the value model beside it only after the last iteration, since
        nothing reads the intermediate ones and each is as big as the policy."""
        from cai_jax.model_ref import record_rl_checkpoint
        from cai_jax.weights.model_dir import save_model_dir
        directory = os.path.join(models_dir, f"step_{done}")
        cfg = self.setup.policy_config
        about = {"render": self.setup.render, "stage": "ppo", "step": done}
        save_model_dir(directory, cfg.replace(heads=("lm",)),
                       _head_view(policy_state.params, ("lm",)), self.setup.tokenizer, about=about)
        if done == self.c.iterations:
            if self.shared:
                value_cfg, value_params = cfg.replace(heads=("scalar",)), policy_state.params
            else:
                value_cfg, value_params = self.setup.value_config, value_state.params
            save_model_dir(os.path.join(directory, "value"), value_cfg,
                           _head_view(value_params, ("scalar",)), self.setup.tokenizer, about=about)
        if processes.is_writer():
            record_rl_checkpoint(models_dir, done, directory)  # what eval and rl_cai[/step_K] read

    def _state_tree(self, policy_state, value_state):
        return ({"policy": policy_state} if self.shared
                else {"policy": policy_state, "value": value_state})

    def _abstract_state(self):
        return self._state_tree(self.steps.policy.abstract_state,
                                None if self.shared else self.steps.value.abstract_state)

    # -- the loop

    def run(self, out_dir: str, models_dir: str, progress: bool = True,
            stop_after: Optional[int] = None, release_host_params: bool = False) -> dict:
        """Runs (or resumes) `iterations` iterations. `stop_after` ends early after
        that iteration, as a kill would (tests). `release_host_params` drops the
        setup's host copy of the starting weights once the state is placed (the
        stage runs once; with a 0.5B policy that copy is 2 GB of a 24 GB
        machine), after which `run` cannot start afresh again. Returns the
        summary numbers."""
        c, s = self.c, self.setup
        if processes.is_writer():
            storage.makedirs(out_dir)
        checkpointer = Checkpointer(os.path.join(out_dir, "ckpt"), keep_last=c.keep_checkpoints)
        writer = MetricWriter(out_dir, "metrics", tensorboard=c.tensorboard)
        # The trainers' order: the latest checkpoint if there is one, else fresh states.
        start = restore_or_init(checkpointer, self._abstract_state(),
                                lambda: self._state_tree(*self.initial_states()),
                                jax.random.key(s.seed), writer)
        policy_state, value_state = start.state["policy"], start.state.get("value")
        if release_host_params:
            # The state is on the devices now; the host copy was the last use.
            s.policy_params = s.value_params = None
            host_memory.release(clear_compiled=False)
        key = start.rng
        beta = float(self.controller.init())
        moments = ro.RunningMoments()
        self.nonfinite = NonfiniteBudget(c.max_nonfinite_skips, start.extra.get("nonfinite_skips", 0))
        if start.resumed:
            beta = float(start.extra["beta"])
            moments = ro.RunningMoments.from_state(start.extra["reward_moments"])
        elif c.eval_every and s.eval_prompts:
            evaluation, records = self.evaluate(policy_state.params, 0)
            self._write_eval(out_dir, 0, records)
            writer.write(0, evaluation)

        bar = tqdm(total=c.iterations, initial=start.step, desc="ppo", disable=not progress,
                   dynamic_ncols=True)
        for it in range(start.step, c.iterations):
            policy_state, value_state, beta, metrics = self.iteration(
                it, policy_state, value_state, beta, moments, key)
            done = it + 1
            if c.eval_every and s.eval_prompts and (done % c.eval_every == 0
                                                    or done == c.iterations):
                evaluation, records = self.evaluate(policy_state.params, done)
                self._write_eval(out_dir, done, records)
                metrics.update(evaluation)
            # NaN (e.g. explained variance of constant returns) is not JSON: log null.
            writer.write(done, {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                for k, v in metrics.items()})
            bar.set_postfix({"reward": f"{metrics['reward_mean']:.3g}",
                             "kl": f"{metrics['kl_k1']:.3g}", "beta": f"{metrics['beta']:.3g}"})
            bar.update(1)
            if done % c.save_every == 0 or done == c.iterations:
                self.save_models(models_dir, done, policy_state, value_state)
                checkpointer.save(done, self._state_tree(policy_state, value_state), key,
                                  {"iteration": done, "beta": beta,
                                   "reward_moments": moments.state_dict(),
                                   "nonfinite_skips": self.nonfinite.used})
            # An iteration's temporaries (logits over a 152k vocabulary, the
            # saves' host copies) go back to the OS before the next one.
            host_memory.trim()
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        writer.close()
        checkpointer.close()
        self.final_states = (policy_state, value_state)
        processes.barrier("ppo metrics written")  # the others read process 0's log
        return summarize(os.path.join(out_dir, "metrics.jsonl"))

    @staticmethod
    def _write_eval(out_dir, step, records):
        if processes.is_writer():
            artifacts.write_jsonl_atomic(eval_records_path(out_dir, step), records)


def eval_records_path(out_dir: str, step: int) -> str:
    """Where the held-out evaluation after `step` iterations keeps its per-prompt rewards."""
    return os.path.join(out_dir, "eval", f"step_{step}.jsonl")


def summarize(metrics_path: str) -> dict:
    """First/last rollout reward, final KL and the held-out reward curve's ends."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_reward" in r]
    out = {}
    if train:
        out.update(iterations=train[-1]["step"], first_reward=train[0]["reward_mean"],
                   last_reward=train[-1]["reward_mean"], final_kl=train[-1]["kl_k1"],
                   final_beta=train[-1]["beta"])
    if evals:
        out.update(eval_reward_first=evals[0]["eval_reward"],
                   eval_reward_last=evals[-1]["eval_reward"])
        out.update(heldout_reward_gain(os.path.dirname(metrics_path), evals[0]["step"], evals[-1]["step"]))
    return out


def heldout_reward_gain(out_dir: str, first: int, last: int) -> dict:
    """The held-out reward's change from the first evaluation to the last,
    paired by prompt (the same prompts each time), with its standard error
    across prompts: whether PPO climbed more than the prompts' noise."""
    paths = [eval_records_path(out_dir, s) for s in (first, last)]
    if first == last or not all(storage.exists(p) for p in paths):
        return {}
    before, after = ({r["id"]: r["reward"] for r in artifacts.read_jsonl(p)} for p in paths)
    gain, se, n = stats.paired_change(before, after)
    if n < 2:
        return {}
    return {"eval_reward_gain": gain, "eval_reward_gain_se": se}


# ------------------------------------------------------------------ stage

def preference_reward(ref, overrides: dict, default_render: str, mesh,
                      batch_size: int) -> ro.PreferenceModelReward:
    """The trained PM (a ModelRef) as a reward function, rendering answers as it
    was trained (the style its model directory records), loaded with `overrides`
    (model_overrides: the configured dtype)."""
    from cai_jax.inference.preference_scorer import PreferenceScorer

    pm = ref.load(overrides, mesh=mesh)
    scorer = PreferenceScorer(pm, style=pm.about.get("render", default_render),
                              max_len=pm.about.get("max_seq_len", 512), batch_size=batch_size,
                              mesh=mesh)
    return ro.PreferenceModelReward(scorer)


def load_setup(config, workdir: str, mesh, reward_fn: Optional[ro.RewardFn] = None) -> PPOSetup:
    """Loads models and prompts as the config says, for the run's `mesh`
    (sharding.mesh_from_config(config) outside a pipeline run). `reward_fn`
    replaces the preference model (tests, synthetic rewards)."""
    from cai_jax.model_ref import resolve

    c = config.ppo
    overrides = model_overrides(c)
    policy = resolve(c.policy, config, workdir).load(overrides["policy"], seed=config.seed,
                                                     to_device=False)
    if policy.tokenizer is None:
        raise ValueError(f"config.ppo.policy {c.policy!r} has no tokenizer; PPO needs one to "
                         "render prompts and decode answers")
    value_config = value_params = None
    if not c.share_trunk:
        value_spec = c.preference_model if c.value_init == "pm" else c.policy
        value = resolve(value_spec, config, workdir).load(overrides["value"], seed=config.seed,
                                                          to_device=False)
        # The value model reads the policy's tokens; the PM (below) reads text.
        if value.config.vocab_size != policy.config.vocab_size:
            raise ValueError(f"config.ppo.value_init='pm' starts the value model from {value_spec!r}, "
                             f"whose vocabulary ({value.config.vocab_size}) is not the policy's "
                             f"({policy.config.vocab_size}): set config.ppo.value_init='policy' "
                             "or config.ppo.share_trunk=True")
        value_config, value_params = value.config, value.params
    if reward_fn is None:
        # The PM scores the answers as text with its own tokenizer, so it need
        # not share the policy's (a SmolLM2 PM can reward a Qwen policy).
        reward_fn = preference_reward(resolve(c.preference_model, config, workdir),
                                      overrides["preference_model"],
                                      config.data.render, mesh, c.rollout_batch_size)

    style, tok = config.data.render, policy.tokenizer

    def pool(kind, split):
        return ro.encode_prompts(ro.load_prompt_pool(config.data, kind, split), style, tok,
                                 c.max_prompt_tokens)

    train_helpful = pool("helpful", "train") if c.red_team_fraction < 1 else []
    train_red = pool("red_team", "train") if c.red_team_fraction > 0 else []
    eval_prompts = pool("red_team", "test") if c.eval_every else []
    if c.eval_prompts:
        eval_prompts = eval_prompts[:c.eval_prompts]
    return PPOSetup(section=c, seed=config.seed, mesh=mesh, tokenizer=tok,
                    policy_config=policy.config, policy_params=policy.params,
                    value_config=value_config, value_params=value_params, reward_fn=reward_fn,
                    train_red_team=train_red, train_helpful=train_helpful,
                    eval_prompts=eval_prompts, render=style, shared_prefix=config.sampling.shared_prefix)


def run_stage(ctx) -> dict:
    setup = load_setup(ctx.config, ctx.workdir, ctx.mesh)
    runner = PPORunner(setup)
    return runner.run(ctx.path("ppo"), ctx.path("models", "rl_cai"), progress=ctx.progress,
                      release_host_params=True)
