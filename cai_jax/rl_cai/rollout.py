"""PPO rollouts and their rewards.

A rollout is: pick prompts (a seeded mix of red-team and helpful ones), render
them for the policy, sample answers with the shared sampler under the current
policy parameters, pack prompt+answer into rows whose answers all start at
the same column (prompt widths are bucketed to powers of two, so iterations
reuse a few compiled shapes), then one forward pass each of policy, reference
and value model over the packed rows.

Rewards follow Ziegler et al. (2019) / Bai et al. (2022): the reward model's
score of the whole answer lands on the answer's last token, and every token
pays -beta * (log pi(a|s) - log pi_ref(a|s)).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import sharding as shd
from cai_jax.data import conversation as conv_lib
from cai_jax.data import prompt_sets
from cai_jax.models.transformer import Transformer, last_valid_index
from cai_jax.rl_cai import ppo_math
from cai_jax.rl_cai.ppo_update import answer_outputs
from cai_jax.weights.tokenizer import encode_text

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ prompts

@dataclasses.dataclass(frozen=True)
class PolicyPrompt:
    """A prompt the policy answers: its conversation and, once encoded, its tokens."""

    id: str
    kind: str  # "red_team" | "helpful"
    conversation: conv_lib.Conversation
    text: str = ""
    tokens: tuple[int, ...] = ()


def load_prompt_pool(data, kind: str, split: str) -> list[PolicyPrompt]:
    """Prompts of one kind and split from config.data (see prompt_sets.load_prompts)."""
    return [PolicyPrompt(p.id, kind, p.conversation()) for p in prompt_sets.load_prompts(data, kind, split)]


def encode_prompts(prompts: Sequence[PolicyPrompt], style: str, tokenizer,
                   max_prompt_tokens: int) -> list[PolicyPrompt]:
    """Renders and tokenizes; prompts longer than `max_prompt_tokens` are dropped
    (truncating one would cut the conversation template)."""
    kept, dropped = [], 0
    for p in prompts:
        text = conv_lib.build_initial_prompt(p.conversation, style=style, tokenizer=tokenizer)
        ids = tuple(encode_text(tokenizer, text))
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        kept.append(dataclasses.replace(p, text=text, tokens=ids))
    if dropped:
        log.warning("dropped %d of %d prompts longer than config.ppo.max_prompt_tokens=%d",
                    dropped, len(prompts), max_prompt_tokens)
    return kept


def choose_prompts(red_team: Sequence[PolicyPrompt], helpful: Sequence[PolicyPrompt],
                   batch_size: int, red_team_fraction: float, seed: int,
                   iteration: int) -> list[PolicyPrompt]:
    """The prompts of one iteration: round(fraction * batch) red-team prompts and
    the rest helpful, drawn without replacement (with, if a pool is too small).
    Seeded by (seed, iteration) alone, so a resumed run draws the same ones."""
    rng = np.random.default_rng([seed, iteration, 17])
    n_red = int(round(red_team_fraction * batch_size))
    if not helpful:
        n_red = batch_size
    if not red_team:
        n_red = 0
    picked = []
    for pool, n in ((red_team, n_red), (helpful, batch_size - n_red)):
        if n == 0:
            continue
        if not pool:
            raise ValueError("config.ppo.red_team_fraction asks for prompts from an empty set; "
                             "check config.data")
        idx = rng.choice(len(pool), size=n, replace=n > len(pool))
        picked += [pool[i] for i in idx]
    order = rng.permutation(len(picked))
    return [picked[i] for i in order]


# ----------------------------------------------------------------- packing

@dataclasses.dataclass
class Rollout:
    """Sampled answers packed into fixed-width rows (see ppo_update for the layout)."""

    prompts: list[PolicyPrompt]
    answers: list[str]
    tokens: np.ndarray  # [B, P + A] int32
    attention_mask: np.ndarray  # [B, P + A] int32
    action_mask: np.ndarray  # [B, A] float32
    sampler_logp: np.ndarray  # [B, A] float32, 0 off the answer
    ended: np.ndarray  # [B] bool: the answer ended by itself (EOS or a stop string),
    #                    rather than being cut off at max_new_tokens

    @property
    def answer_lengths(self) -> np.ndarray:
        return self.action_mask.sum(axis=1)

    @property
    def answer_tokens(self) -> list[np.ndarray]:
        width = self.action_mask.shape[1]
        lengths = self.answer_lengths.astype(int)
        return [row[-width:][:n] for row, n in zip(self.tokens, lengths)]


def pack_rollout(prompts: Sequence[PolicyPrompt], samples, prompt_width: int, answer_width: int,
                 pad_id: int) -> Rollout:
    """Left-pads each prompt to `prompt_width` and right-pads each answer to
    `answer_width`, so every row's answer starts at the same column."""
    b = len(prompts)
    tokens = np.full((b, prompt_width + answer_width), pad_id, np.int32)
    attention = np.zeros((b, prompt_width + answer_width), np.int32)
    action = np.zeros((b, answer_width), np.float32)
    logp = np.zeros((b, answer_width), np.float32)
    eos = np.zeros((b,), bool)
    for i, (prompt, sample) in enumerate(zip(prompts, samples)):
        p = list(prompt.tokens)
        a = list(sample.tokens)[:answer_width]
        if len(p) > prompt_width:
            raise ValueError(f"prompt {prompt.id} has {len(p)} tokens, more than the prompt "
                             f"width {prompt_width}")
        tokens[i, prompt_width - len(p):prompt_width] = p
        attention[i, prompt_width - len(p):prompt_width + len(a)] = 1
        tokens[i, prompt_width:prompt_width + len(a)] = a
        action[i, :len(a)] = 1.0
        logp[i, :len(a)] = np.asarray(sample.logprobs, np.float32)[:len(a)]
        eos[i] = sample.finish_reason != "length"
    return Rollout(list(prompts), [s.text for s in samples], tokens, attention, action, logp, eos)


# ------------------------------------------------------- forward passes

def build_rollout_scorer(policy_model: Transformer, ref_model: Transformer,
                         value_model: Optional[Transformer], temperature: float,
                         rules=shd.DEFAULT_RULES):
    """jit(policy_params, ref_params, value_params, tokens, attention_mask,
    action_mask) -> {logp_policy, logp_ref, values, entropy}, all [B, A] and 0
    off the answer. With value_model None the policy's scalar head gives the
    values (shared trunk)."""
    def score(policy_params, ref_params, value_params, tokens, attention_mask, action_mask):
        with nn.logical_axis_rules(rules):
            return _score(policy_params, ref_params, value_params, tokens, attention_mask,
                          action_mask)

    def _score(policy_params, ref_params, value_params, tokens, attention_mask, action_mask):
        answer_len = action_mask.shape[1]
        pol = answer_outputs(policy_model, policy_params, tokens, attention_mask, answer_len,
                             temperature)
        ref = answer_outputs(ref_model, ref_params, tokens, attention_mask, answer_len,
                             temperature)
        if value_model is None:
            values = pol["values"]
        else:
            values = answer_outputs(value_model, value_params, tokens, attention_mask,
                                    answer_len)["values"]
        logp_all = jax.nn.log_softmax(pol["logits"], axis=-1)
        entropy = -jnp.sum(jnp.exp(logp_all) * jnp.where(jnp.isfinite(logp_all), logp_all, 0.0),
                           axis=-1)
        return {"logp_policy": pol["logp"] * action_mask, "logp_ref": ref["logp"] * action_mask,
                "values": values * action_mask, "entropy": entropy * action_mask}
    return jax.jit(score)


# ----------------------------------------------------------------- rewards

# A reward function scores whole answers: rollout -> [B] float scores.
RewardFn = Callable[[Rollout], np.ndarray]


class PreferenceModelReward:
    """Scores answers with the trained preference model through its own scorer
    (`inference.preference_scorer.PreferenceScorer`), which renders prompt and answer text exactly
    as the PM saw them in training and reads the score at the last token."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, rollout: Rollout) -> np.ndarray:
        conversations = [p.conversation for p in rollout.prompts]
        return np.asarray(self.scorer.score(conversations, rollout.answers), np.float32)


@dataclasses.dataclass
class RunningMoments:
    """Running mean and variance of every score seen (Chan et al. parallel
    update), for reward normalisation; JSON-serialisable for checkpoints."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        n = x.size
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(np.square(x - batch_mean).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 1.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "RunningMoments":
        return cls(**state)


def process_scores(raw_b: np.ndarray, ended_b: np.ndarray, moments: Optional[RunningMoments],
                   *, normalize: bool, eos_penalty: float, clip: float) -> np.ndarray:
    """Raw reward-model scores -> the scores PPO optimises: normalised by the
    running mean/std (updated with this batch first), minus `eos_penalty` for
    answers cut off at max_new_tokens, clipped to [-clip, clip] (0 = no clip)."""
    scores = np.asarray(raw_b, np.float64)
    if normalize:
        moments.update(scores)
        scores = (scores - moments.mean) / max(moments.std, 1e-6)
    scores = scores - eos_penalty * (~np.asarray(ended_b, bool))
    if clip:
        scores = np.clip(scores, -clip, clip)
    return scores.astype(np.float32)


@jax.jit
def _shaped(scores_b, logp_policy, logp_ref, mask, beta):
    last = last_valid_index(mask)
    return ppo_math.kl_penalty_rewards(logp_policy, logp_ref, mask, scores_b, beta, last)


def shaped_rewards(scores_b, logp_policy_ba, logp_ref_ba, mask_ba, beta):
    """Per-token rewards (score on the last answer token, -beta * log-ratio on
    every token) and the per-answer KL estimates k1 and k3, as NumPy."""
    rewards, k1, k3 = _shaped(jnp.asarray(scores_b, jnp.float32), jnp.asarray(logp_policy_ba),
                              jnp.asarray(logp_ref_ba), jnp.asarray(mask_ba, jnp.float32),
                              jnp.float32(beta))
    return np.asarray(rewards), np.asarray(k1), np.asarray(k3)


def sampler_seed(seed: int, iteration: int, purpose: int = 0) -> int:
    """A 31-bit sampler seed from (run seed, iteration, purpose)."""
    return int(np.random.SeedSequence([seed, iteration, purpose]).generate_state(1)[0] & 0x7FFFFFFF)

