"""Preference-model scoring: how an answer is laid out for a preference model
(PM), the score read at its last token, and `PreferenceScorer`, which PPO,
evaluation and `tools.score_pairs` use.

The layout is the sampler's: prompt and answer tokenized apart, and with the
chat template a finished answer ends in its end-of-turn token, so PPO, which
reads the PM on sampled rows, sees what the PM was trained on (training,
rl_cai/preference.py, tokenizes its pairs with `encode_answer` too).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cai_jax import sharding as shd
from cai_jax.data.conversation import Conversation, Turn, render_chat, render_hh
from cai_jax.inference.batched_forward import batched_forward
from cai_jax.models.transformer import Transformer, last_valid_index, positions_from_mask
from cai_jax.weights.loader import LoadedModel, load_model
from cai_jax.weights.tokenizer import encode_text, pad_token_id, stop_token_ids

# What a model loaded as a PM gets instead of its language-model head.
SCALAR_HEAD = {"heads": ("scalar",)}


@functools.lru_cache(maxsize=8)
def end_of_answer_ids(tokenizer, style: str) -> tuple[int, ...]:
    """The token a finished answer ends with, as the sampler returns it.

    Chat: the template's end-of-turn token ("<|im_end|>" for SmolLM2), which
    the sampler keeps as the answer's last token when the model stops by
    itself, so PPO reads the PM there. HH text: none (answers end where the
    next "Human:" turn would start, and that stop string is cut).
    """
    if style != "chat":
        return ()
    prompt = render_chat((Turn("user", "x"),), tokenizer, add_generation_prompt=True)
    full = render_chat((Turn("user", "x"), Turn("assistant", "y")), tokenizer, add_generation_prompt=False)
    stops = set(stop_token_ids(tokenizer))
    ends = [t for t in encode_text(tokenizer, full[len(prompt):]) if t in stops]
    return tuple(ends[:1])


def encode_answer(tokenizer, conversation: Sequence[Turn], answer: str, style: str,
                  max_len: int, complete: bool = True) -> tuple[list[int], bool]:
    """Token ids of the conversation's prompt followed by `answer`, as the
    sampler produces them (prompt and answer tokenized apart; a `complete`
    answer keeps its end-of-turn token), and whether the row was cut:
    too-long rows keep their last `max_len` tokens, because the score is read
    at the end."""
    conversation = tuple(conversation)
    if style == "chat":
        ids = encode_text(tokenizer, render_chat(conversation, tokenizer, add_generation_prompt=True))
        ids += encode_text(tokenizer, answer)
    elif style == "hh":
        ids = encode_text(tokenizer, render_hh(conversation, add_generation_prompt=True))
        ids += encode_text(tokenizer, " " + answer)
    else:
        raise ValueError(f"render style must be 'chat' or 'hh', got {style!r}")
    if complete:
        ids += list(end_of_answer_ids(tokenizer, style))
    if len(ids) > max_len:
        return ids[len(ids) - max_len:], True
    return ids, False


def make_score_fn(model: Transformer):
    """(params, tokens [B,T], mask [B,T]) -> [B] scores at each row's last real token."""
    def score(params, tokens_bt, mask_bt):
        with nn.logical_axis_rules(shd.DEFAULT_RULES):
            outputs, _ = model.apply({"params": params}, tokens_bt, positions_from_mask(mask_bt), mask_bt)
        last = last_valid_index(mask_bt)
        return jnp.take_along_axis(outputs["scalar"], last[:, None], axis=1)[:, 0]
    return score


class PreferenceScorer:
    """Scores (conversation, answer) pairs with a trained preference model.

        scorer = PreferenceScorer.from_dir("<workdir>/models/pm", mesh=mesh)
        scores = scorer.score(conversations, answers)          # [N] floats
        p = scorer.prob_first(conversations, answers_a, answers_b)

    Answers are rendered as in training (the render style stored beside the
    weights unless given); rows are batched in similar lengths and padded to
    buckets so few shapes compile, and split over `mesh` (the run's:
    sharding.mesh_from_config).
    """

    def __init__(self, model: LoadedModel, *, style: str = "chat", max_len: int = 512,
                 batch_size: int = 8, min_bucket: int = 64, mesh: Mesh):
        if "scalar" not in model.config.heads:
            raise ValueError(f"{model.source}: a preference model needs heads=('scalar',), "
                             f"got {model.config.heads}")
        if model.tokenizer is None:
            raise ValueError(f"{model.source}: the preference model has no tokenizer")
        self.config, self.tokenizer, self.style = model.config, model.tokenizer, style
        self.max_len = min(max_len, model.config.max_seq_len)
        self.min_bucket = min_bucket
        self.mesh = mesh
        self.batch_size = batch_size
        self.params = shd.place(model.params, shd.param_shardings(model.config, self.mesh))
        self.pad_id = pad_token_id(self.tokenizer)
        self._score = jax.jit(make_score_fn(Transformer(model.config)))

    @classmethod
    def from_dir(cls, directory: str, *, style: Optional[str] = None, max_len: Optional[int] = None,
                 batch_size: int = 8, mesh: Mesh) -> "PreferenceScorer":
        directory = directory[len("ckpt:"):] if directory.startswith("ckpt:") else directory
        # Loaded with the heads it was saved with: forcing a scalar head here made
        # a policy directory a PM with a zero head (p = 0.5 for every pair).
        model = load_model("ckpt:" + directory)
        return cls(model, style=style or model.about.get("render", "chat"),
                   max_len=max_len or model.about.get("max_seq_len", 512), batch_size=batch_size, mesh=mesh)

    def score_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """[N] scores of token-id rows (prompt + answer), read at each row's end."""
        scores = batched_forward(functools.partial(self._score, self.params), rows,
                                 batch_size=self.batch_size, min_width=self.min_bucket,
                                 max_width=self.max_len, pad_id=self.pad_id, mesh=self.mesh)
        return np.asarray(scores, np.float64).reshape(len(rows))

    def score(self, conversations: Sequence[Conversation], answers: Sequence[str],
              complete: bool = True) -> np.ndarray:
        """[N] scores; `complete` answers get their end-of-turn token, as in training."""
        if len(conversations) != len(answers):
            raise ValueError(f"{len(conversations)} conversations but {len(answers)} answers")
        rows = [encode_answer(self.tokenizer, c, a, self.style, self.max_len, complete)[0]
                for c, a in zip(conversations, answers)]
        return self.score_ids(rows)

    def prob_first(self, conversations: Sequence[Conversation], answers_a: Sequence[str],
                   answers_b: Sequence[str]) -> np.ndarray:
        """p(answer_a preferred) = sigmoid(score_a - score_b) per pair."""
        n = len(conversations)
        scores = self.score(list(conversations) * 2, list(answers_a) + list(answers_b))
        return 1.0 / (1.0 + np.exp(-(scores[:n] - scores[n:])))
