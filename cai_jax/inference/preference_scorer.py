"""Preference-model scoring: the row a preference model (PM) reads for an
answer, the score read at its last token, and `PreferenceScorer`, which PPO,
evaluation and `tools.score_pairs` use.

A row is the prompt and answer as `data.conversation.encode_answer` lays them
out for every stage, the sampler's layout, so PPO, which reads the PM on
sampled answers, sees what the PM was trained on (training,
rl_cai/preference.py, builds its rows with `preference_row` too).
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
from cai_jax.data.conversation import Conversation, Turn, encode_answer
from cai_jax.inference.batched_forward import batched_forward
from cai_jax.models.transformer import Transformer, last_valid_index, positions_from_mask
from cai_jax.weights.loader import LoadedModel, load_model
from cai_jax.weights.tokenizer import pad_token_id

# What a model loaded as a PM gets instead of its language-model head.
SCALAR_HEAD = {"heads": ("scalar",)}


def preference_row(tokenizer, conversation: Sequence[Turn], answer: str, style: str,
                   max_len: int, complete: bool = True) -> tuple[list[int], bool]:
    """Token ids of the conversation's prompt followed by `answer`, and whether
    the row was cut: too-long rows keep their last `max_len` tokens, because
    the score is read at the end.

    A `complete` chat answer ends in its end-of-turn token, where a chat model
    stops. HH rows end at the answer's text whether it is complete or not: a
    sampled HH answer ends either at EOS or at a stop string that is cut off,
    so no token closes every finished one.
    """
    prompt_ids, answer_ids = encode_answer(tokenizer, conversation, answer, style,
                                           end=complete and style == "chat")
    ids = prompt_ids + answer_ids
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

    Pairs of answers are judged by eval/judges.PreferenceModelJudge:
    p(A preferred) = sigmoid(score_A - score_B).

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
        rows = [preference_row(self.tokenizer, c, a, self.style, self.max_len, complete)[0]
                for c, a in zip(conversations, answers)]
        return self.score_ids(rows)
