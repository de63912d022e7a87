"""Multiple-choice scoring: the log-probabilities of option tokens at the end
of each prompt, from one forward pass (no sampling).

Used by AI feedback (rl_cai/feedback.py). Options such as " (A)" and " (B)"
often share leading tokens (SmolLM2 splits " (A)" into " (", "A", ")"): the
shared prefix is appended to every prompt and the first differing tokens are
compared there.

The forward pass is the sampler's (`Sampler.next_token_logprobs`): the same
trunk as generation, and prompts that share a start (given the same `keys`)
have it computed once (inference/prefix_groups.py); the log-probs are the
same within float rounding.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from cai_jax import sharding as shd
from cai_jax.inference.sampling import Sampler
from cai_jax.weights.tokenizer import encode_text


def option_token_ids(tokenizer, options: Sequence[str]) -> tuple[list[int], int, int]:
    """(shared prefix ids, first differing id of option A, of option B).

    The options (" (A)" and " (B)" in the paper's format) must tokenize into a common prefix followed by one
    differing token; the prefix is appended to every prompt and the label
    compares the two differing tokens there.
    """
    ids_a, ids_b = encode_text(tokenizer, options[0]), encode_text(tokenizer, options[1])
    n = 0
    while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
        n += 1
    if n >= len(ids_a) or n >= len(ids_b):
        raise ValueError(
            f"options {options[0]!r} -> {ids_a} and {options[1]!r} -> {ids_b}: one "
            "tokenization is a prefix of the other, so no single token tells them apart; "
            "use a tokenizer that splits the option letters into their own tokens")
    return ids_a[:n], ids_a[n], ids_b[n]


class OptionScorer:
    """Log-probs of the two option tokens at the end of each prompt, from one
    forward pass per batch (`p_first_and_mass` turns them into a label).

    Prompts are token ids that already end with the options' shared prefix.
    The model computes logits only at each prompt's last position, never
    [B, T, vocab]. `mesh` is the one it runs on (the run's: sharding.mesh_from_config).
    """

    def __init__(self, model_config, params, token_a: int, token_b: int, *, batch_size: int = 8,
                 max_len: int = 1024, min_bucket: int = 128, mesh: Mesh):
        if "lm" not in model_config.heads:
            raise ValueError(f"the feedback model needs a language-model head; it has {model_config.heads}")
        self.mesh = mesh
        self.params = shd.place(params, shd.param_shardings(model_config, self.mesh))
        self.sampler = Sampler(model_config, None, mesh=self.mesh, progress=False)
        self.token_ids = (int(token_a), int(token_b))
        self.max_len, self.min_bucket, self.batch_size = max_len, min_bucket, batch_size

    def option_logprobs(self, prompts: Sequence[Sequence[int]], progress: bool = False,
                        keys: Optional[Sequence[Hashable]] = None) -> np.ndarray:
        """[N, 2] log-probs of the two option tokens after each prompt.

        keys: one per prompt; prompts with the same key have their common
        start computed once (a full forward pass per prompt without them).
        """
        for i, p in enumerate(prompts):
            if len(p) > self.max_len:
                raise ValueError(f"feedback prompt {i} has {len(p)} tokens, more than the limit of {self.max_len}")
        bar = tqdm(total=len(prompts), desc="feedback", unit="prompt", disable=not progress, leave=False)
        logp = self.sampler.next_token_logprobs(self.params, prompts, self.token_ids, batch_size=self.batch_size,
                                                keys=keys, min_width=self.min_bucket, on_batch=bar.update)
        bar.close()
        return np.asarray(logp, np.float64)


def p_first_and_mass(logp_n2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From [N, 2] option log-probs: p(option A) among the two, and the option
    mass, the probability the model puts on the two options together. A low mass
    means the model is not answering the question it is asked (or is broken), so
    its p(option A) says little."""
    logp = np.asarray(logp_n2, np.float64)
    return 1.0 / (1.0 + np.exp(logp[:, 1] - logp[:, 0])), np.exp(logp).sum(axis=1)
