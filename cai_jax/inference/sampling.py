"""The one KV-cache sampler every stage uses, and a log-prob scorer beside it.

    sampler = Sampler(model_config, tokenizer, mesh=None)
    samples = sampler.generate(params, prompts, SamplingParams(temperature=0.7),
                               seed=0, example_ids=None, batch_size=8)
    logprobs = sampler.score(params, prompts, continuations)

`generate` sorts the prompts by length, cuts them into batches, left-pads each
batch and runs two compiled functions on it: `prefill` (the whole prompt in one
forward pass that fills the KV cache and picks the first token) and `decode` (a
`lax.while_loop` of one-token steps over the donated cache, which exits as soon
as every row has stopped). Results come back in input order.

With `shared_prefix`, prompts that share a start (few-shot exemplars, a
system message, the chat header) are batched together and prefill runs each
batch's shared starts once, then only each row's own suffix over a copy of
its start's cache (`prefix_groups.py` finds the groups; `_run_prompts` holds
both layouts). A `KVStore` carries each example's sequence from one call to
the next, so a prompt that continues the last call's prompt and answer
prefills only what is new (`kv_store.py`). Either way the answers are those
of whole prompts up to float rounding (greedy tokens identical in the tests).

The forward pass is a trunk chosen by name (`trunks/`): on one device
`models/feature_major.py` (the model's math with weights-first products,
faster on XLA:CPU), with a mesh the Flax model. Either way the logits come
out vocabulary-major, [V, B].

Shapes are bucketed so that varied calls reuse a few compilations: generation
width and batch size are each rounded up to a power of two, prompt width to a
power of two or three quarters of one. What
else varies per call (temperature, top-k, top-p, stop token ids, the token
limit, the seed) is traced, except which filters are on at all (greedy or not,
top-k on, top-p on), since that changes the program. How tokens are chosen
is in `sampling_choice`, the host-side batching in `sampling_buckets`.

Randomness is per example: the key of example i at step t is
fold_in(fold_in(key(seed), example_id_i), t), so a sample depends on the seed,
its example id and its prompt, never on the batch or row it landed in.

Log-probs are those of the chosen token under the model's own distribution,
before temperature, top-k or top-p (what PPO's importance ratio needs).

Stop strings are found on the host. Without them one decode call runs to the
end; with them the loop runs in segments of `stop_check_interval` steps and the
host marks rows whose text already holds a stop string as done, so they stop
costing steps. The text is cut before the earliest stop string and the tokens
(and log-probs) are cut to the tokens whose text is the kept text.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cai_jax import processes, sharding as shd
from cai_jax.inference import kv_store as kv_store_lib
from cai_jax.inference import prefix_groups
from cai_jax.inference.batched_forward import batch_row_multiple, batched_forward, place_batch
from cai_jax.inference.trunks import make_trunk
from cai_jax.inference.trunks.base import TRACE_COUNTS, DerivedWhileAlive, Trunk
from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import positions_from_mask
from cai_jax.inference.sampling_buckets import (ExampleId, bucket, example_key_id, find_stop, left_pad,
                                      length_sorted_batches, tokens_within, width_bucket)
from cai_jax.inference.sampling_choice import Mode, choose_tokens
from cai_jax.weights.tokenizer import encode_text, pad_token_id, stop_token_ids

Prompt = Union[str, Sequence[int]]

FINISH_REASONS = ("eos", "stop_string", "length")
MIN_PROMPT_BUCKET = 16
MIN_GEN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    `stop_token_ids` None means the tokenizer's (EOS and end-of-turn);
    `ignore_eos` samples past them (benchmarks force a length with it).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: Optional[tuple[int, ...]] = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature is {self.temperature}; must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k is {self.top_k}; must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p is {self.top_p}; must be in (0, 1] (1 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens is {self.max_new_tokens}; must be >= 1")
        if isinstance(self.stop_strings, str) or any(not s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop_strings is {self.stop_strings!r}; it must be a "
                             "tuple of non-empty strings")


@dataclasses.dataclass
class Sample:
    """One answer. `tokens` and `logprobs` are the kept generated tokens (the
    stop token that ended an "eos" answer included); `text` is their decoding
    without special tokens, cut before any stop string."""

    text: str
    tokens: np.ndarray  # int32 [n]
    logprobs: np.ndarray  # float32 [n]: log p(token) before temperature/top-k/top-p
    prompt_tokens: np.ndarray  # int32 [prompt length]
    finish_reason: str  # "eos" | "stop_string" | "length"


def samples_to_arrays(samples: Sequence[Sample], width: Optional[int] = None,
                      pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-padded [N, width] tokens and log-probs, and the mask of valid tokens."""
    width = width if width is not None else max([len(s.tokens) for s in samples] + [1])
    tokens = np.full((len(samples), width), pad_id, np.int32)
    logprobs = np.zeros((len(samples), width), np.float32)
    mask = np.zeros((len(samples), width), bool)
    for i, s in enumerate(samples):
        n = min(len(s.tokens), width)
        tokens[i, :n], logprobs[i, :n], mask[i, :n] = s.tokens[:n], s.logprobs[:n], True
    return {"tokens": tokens, "logprobs": logprobs, "mask": mask}


# ----------------------------------------------------------- choosing tokens

def _mode_of(sp: SamplingParams) -> Mode:
    greedy = sp.temperature == 0
    return Mode(greedy=greedy, top_k=not greedy and sp.top_k > 0, top_p=not greedy and sp.top_p < 1.0)


def _is_stop(tokens_b, stop_ids_n):
    """stop_ids_n is padded with -1, which no token equals."""
    return jnp.any(tokens_b[:, None] == stop_ids_n[None, :], axis=-1)


def _step_keys(row_keys_b, step):
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys_b)


# ----------------------------------------------------------- compiled pieces
#
# Each takes the sampler's trunk (`trunks/base.py`) as a static argument: what
# it runs the model with, and where its cache lives. TRACE_COUNTS counts how
# often each was traced, i.e. compiled.

def _run_prompts(trunk: Trunk, params, prompt: dict, free_slots: int, last_only: bool = True):
    """The prompts through the trunk into a new KV cache with `free_slots`
    empty slots after them. `prompt` is one of the layouts `_prompt_arrays`
    makes: whole rows ("tokens", "mask": [B, W], left-padded), or shared
    prefixes ("prefix", "prefix_mask": [G, Wp]) that run once each and
    suffixes ("suffix", "suffix_mask": [B, Ws]) that read their "group"'s
    prefix from the cache; or, instead of prefix tokens, their keys and values
    from an earlier call ("prefix_kv", one row per suffix: `kv_store.py`). A
    suffix's padding sits between its prefix and its tokens, masked out, and
    its positions continue from its prefix's length, so every row sees
    exactly its unpadded prompt.

    Returns (final hidden states [D, B] of each row's last token, or [D, B*W]
    of every prompt slot without `last_only`; the cache; the key mask
    [B, prompt slots + free_slots]; the prompt lengths [B])."""
    if "tokens" in prompt:
        tokens_bp, mask_bp = prompt["tokens"], prompt["mask"]
        b, p = tokens_bp.shape
        key_mask_bs = jnp.concatenate([mask_bp, jnp.ones((b, free_slots), bool)], axis=1)
        hidden, cache = trunk.forward(params, tokens_bp, positions_from_mask(mask_bp), key_mask_bs,
                                      cache=trunk.new_cache(b, p + free_slots), cache_index=0,
                                      last_only=last_only)
        return hidden, cache, key_mask_bs, jnp.sum(mask_bp, axis=1, dtype=jnp.int32)
    prefix_mask_gp = prompt["prefix_mask"]
    suffix_bs, suffix_mask_bs, group_b = prompt["suffix"], prompt["suffix_mask"], prompt["group"]
    (g, wp), (b, ws) = prefix_mask_gp.shape, suffix_bs.shape
    if "prefix_kv" in prompt:  # computed by an earlier call, one row per suffix
        cache = trunk.new_cache(b, wp + ws + free_slots)
        stored = prompt["prefix_kv"]
        cache = {"k": jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, 0, c.ndim - 1),
                                   cache["k"], stored["k"]),
                 "v": jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, 0, c.ndim - 2),
                                   cache["v"], stored["v"])}
    else:
        prefix_gp = prompt["prefix"]
        # Written from slot 0, the prefix attends only to its own slots (write_cache).
        _, cache = trunk.forward(params, prefix_gp, positions_from_mask(prefix_mask_gp), prefix_mask_gp,
                                 cache=trunk.new_cache(g, wp + ws + free_slots), cache_index=0,
                                 last_only=True)
        cache = trunk.constrain(jax.tree.map(lambda c: jnp.take(c, group_b, axis=trunk.cache_batch_axis),
                                             cache), trunk.cache_names)
    prefix_len_b = jnp.sum(prefix_mask_gp, axis=1, dtype=jnp.int32)[group_b]
    key_mask_bs = jnp.concatenate([prefix_mask_gp[group_b], suffix_mask_bs,
                                   jnp.ones((b, free_slots), bool)], axis=1)
    positions_bs = prefix_len_b[:, None] + positions_from_mask(suffix_mask_bs)
    hidden, cache = trunk.forward(params, suffix_bs, positions_bs, key_mask_bs, cache=cache,
                                  cache_index=wp, last_only=last_only)
    return hidden, cache, key_mask_bs, prefix_len_b + jnp.sum(suffix_mask_bs, axis=1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("gen_width", "mode", "pad_id"))
def _prefill(trunk: Trunk, params, prompt: dict, row_ids_b, active_b, seed, knobs,
             *, gen_width: int, mode: Mode, pad_id: int):
    """Fills the cache from the prompts (`_run_prompts`) and picks each row's first token."""
    TRACE_COUNTS["prefill"] += 1
    hidden_db, cache, key_mask_bs, prompt_lens_b = _run_prompts(trunk, params, prompt, gen_width)
    b = hidden_db.shape[1]
    row_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids_b)
    logits = trunk.logits_vb(params, hidden_db)
    first, first_logp = choose_tokens(logits, _step_keys(row_keys, 0),
                                      knobs["temperature"], knobs["top_k"], knobs["top_p"], mode)
    first = jnp.where(active_b, first, pad_id)
    return {
        "cache": cache,
        "tokens": jnp.full((b, gen_width), pad_id, jnp.int32).at[:, 0].set(first),
        "logprobs": jnp.zeros((b, gen_width), jnp.float32).at[:, 0].set(
            jnp.where(active_b, first_logp, 0.0)),
        "num_tokens": active_b.astype(jnp.int32),  # valid tokens per row
        "done": ~active_b | _is_stop(first, knobs["stop_ids"]),
        "step": jnp.ones((), jnp.int32),  # tokens generated so far
        "prompt_lens": prompt_lens_b,
        "key_mask": key_mask_bs,
        "row_keys": row_keys,
    }


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mode", "pad_id"), donate_argnums=(2,))
def _decode(trunk: Trunk, params, state, limit, force_done_b, knobs, *, mode: Mode, pad_id: int):
    """One-token steps over the donated state until `limit` tokens exist or
    every row is done."""
    TRACE_COUNTS["decode"] += 1
    gen_width = state["tokens"].shape[1]
    prompt_width = state["key_mask"].shape[1] - gen_width

    def unfinished(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def step_once(s):
        step = s["step"]
        last_b1 = jax.lax.dynamic_slice_in_dim(s["tokens"], step - 1, 1, axis=1)
        # The last token goes to cache slot prompt_width + step - 1.
        hidden_db, cache = trunk.forward(params, last_b1, (s["prompt_lens"] + step - 1)[:, None],
                                         s["key_mask"], cache=s["cache"],
                                         cache_index=prompt_width + step - 1, last_only=True)
        logits = trunk.logits_vb(params, hidden_db)
        new, new_logp = choose_tokens(logits, _step_keys(s["row_keys"], step),
                                      knobs["temperature"], knobs["top_k"], knobs["top_p"], mode)
        live = ~s["done"]
        new = jnp.where(live, new, pad_id)
        return dict(
            s, cache=cache, step=step + 1,
            tokens=jax.lax.dynamic_update_index_in_dim(s["tokens"], new, step, axis=1),
            logprobs=jax.lax.dynamic_update_index_in_dim(
                s["logprobs"], jnp.where(live, new_logp, 0.0), step, axis=1),
            num_tokens=s["num_tokens"] + live.astype(jnp.int32),
            done=s["done"] | (live & _is_stop(new, knobs["stop_ids"])))

    state = dict(state, done=state["done"] | force_done_b)
    return jax.lax.while_loop(unfinished, step_once, state)


@functools.partial(jax.jit, static_argnums=0)
def _score(trunk: Trunk, params, prompt: dict):
    """log p(slot t + 1 | slots up to t) over each row's prompt slots (whole
    rows, or the suffixes after the shared prefixes): [B, W-1]."""
    TRACE_COUNTS["score"] += 1
    hidden_dn, _, _, _ = _run_prompts(trunk, params, prompt, free_slots=0, last_only=False)
    tokens_bt = prompt["tokens" if "tokens" in prompt else "suffix"]
    b, t = tokens_bt.shape
    predicting = hidden_dn.reshape(-1, b, t)[:, :, :-1].reshape(hidden_dn.shape[0], -1)
    logits = trunk.logits_vb(params, predicting).reshape(-1, b, t - 1)  # [V, B, T-1]
    target = jnp.take_along_axis(logits, tokens_bt[None, :, 1:], axis=0)[0]
    return target - jax.nn.logsumexp(logits, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logprobs(trunk: Trunk, params, prompt: dict, token_ids_k):
    """log p(token k | the whole prompt) for the given tokens: [B, K]."""
    TRACE_COUNTS["next_token"] += 1
    hidden_db, _, _, _ = _run_prompts(trunk, params, prompt, free_slots=0)
    logits_vb = trunk.logits_vb(params, hidden_db)
    return (logits_vb[token_ids_k] - jax.nn.logsumexp(logits_vb, axis=0)).T


# ----------------------------------------------------------- the sampler

class Sampler:
    """Prefill / decode / score for one model config; params come per call.

    With a mesh, parameters are placed as `sharding.param_shardings` says (a
    no-op for parameters already placed so) and batches go over the mesh's
    batch axes; with `mesh=None` (passed explicitly) everything runs on the default device.

    `unroll_layers` (default) runs the layers unrolled with one cache buffer per
    layer: on XLA:CPU a scanned decode step copies every layer's weights out of
    the stacked array, which made it about twice as slow (`bench_sampler.py --scanned`),
    but the unrolled program takes longer to compile.

    `trunk` names what runs the model (`trunks/__init__.py`): None picks
    "feature_major" (`models/feature_major.py`) on one device (no mesh, or a
    one-device mesh) with unrolled layers, else "flax" (the Flax model);
    trunk="flax" runs the Flax model anywhere, for comparisons. The
    feature-major trunk keeps a transposed copy of the weights while the
    caller's parameter arrays live; the Flax trunk converts parameters in the
    other layer layout once per call.
    """

    def __init__(self, model_config: TransformerConfig, tokenizer, mesh: Optional[Mesh],
                 rules=shd.DEFAULT_RULES, stop_check_interval: int = 16, progress: bool = True,
                 unroll_layers: bool = True, trunk: Optional[str] = None,
                 shared_prefix: bool = False):
        if "lm" not in model_config.heads:
            raise ValueError(f"the sampler needs a model with an 'lm' head; heads are "
                             f"{model_config.heads}")
        # No rematerialisation: nothing is differentiated here, and remat would
        # hide the prefill's static cache index from `write_cache` (shared
        # prefixes then attend over slots their key mask does not cover).
        self.config = model_config.replace(heads=("lm",), scan_layers=not unroll_layers, remat="none")
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = tuple(rules)
        self.stop_check_interval = stop_check_interval
        self.progress = progress
        self.shared_prefix = shared_prefix
        self.pad_id = pad_token_id(tokenizer)
        self.default_stop_ids = tuple(stop_token_ids(tokenizer)) if tokenizer is not None else ()
        self.decode_steps = 0  # while-loop iterations run, summed over calls
        self.trunk = make_trunk(trunk, self.config, mesh, self.rules)
        # What the trunk derives from the caller's parameters (its transposed
        # copies), kept here rather than in the trunk so that it goes with the
        # sampler: the compiled functions' caches hold on to the trunk.
        self._trunk_memo = DerivedWhileAlive()

    @property
    def batch_multiple(self) -> int:
        """Batch rows must split evenly over the mesh's batch axes."""
        return batch_row_multiple(self.mesh, self.rules)

    def place_params(self, params):
        """The parameters as the compiled functions take them, without heads the
        sampler does not use: as the trunk wants them (`Trunk.place_params`)."""
        params = {k: v for k, v in params.items() if k != "scalar_head"}
        return self.trunk.place_params(params, self._trunk_memo)

    def _put_batch(self, x):
        return place_batch(x, self.mesh, self.rules)

    # -- generation

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt. Strings are tokenized without adding special
        tokens: a rendered prompt already holds its template's own."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer; pass token ids instead")
            return encode_text(self.tokenizer, prompt)
        return [int(t) for t in prompt]

    def _knobs(self, sp: SamplingParams) -> dict:
        stops = () if sp.ignore_eos else (sp.stop_token_ids if sp.stop_token_ids is not None
                                          else self.default_stop_ids)
        stop_ids = np.full((bucket(len(stops), 4),), -1, np.int32)
        stop_ids[:len(stops)] = stops
        return {"temperature": np.float32(max(sp.temperature, 1e-6)), "top_k": np.int32(sp.top_k),
                "top_p": np.float32(sp.top_p), "stop_ids": stop_ids}

    def generate(self, params, prompts: Sequence[Prompt], sampling: SamplingParams = SamplingParams(),
                 seed: int = 0, example_ids: Optional[Sequence[ExampleId]] = None,
                 batch_size: int = 8, progress: Optional[bool] = None,
                 shared_prefix: Optional[bool] = None,
                 kv_store: Optional[kv_store_lib.KVStore] = None) -> list[Sample]:
        """One answer per prompt (a string or token ids), in input order.

        `example_ids` (ints or strings; default the input index) pick each
        prompt's random stream; `batch_size` caps the rows decoded together;
        `shared_prefix` (default: the sampler's) computes starts that prompts
        share once per batch (`prefix_groups.auto_keys` finds them).
        `kv_store` keeps each example's sequence for the next call that passes
        it, and reads from it the starts this call's prompts have in common
        with the last one's (`kv_store.py`).
        """
        prompts = [self.encode(p) for p in prompts]
        example_ids = list(range(len(prompts))) if example_ids is None else list(example_ids)
        if len(example_ids) != len(prompts):
            raise ValueError(f"{len(example_ids)} example ids for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; it needs at least one token")
            if len(p) + sampling.max_new_tokens > self.config.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens="
                                 f"{sampling.max_new_tokens} it exceeds the model's context of "
                                 f"{self.config.max_seq_len}")
        if self.tokenizer is None:
            raise ValueError("generate needs a tokenizer: samples carry their text "
                             "(score takes token ids without one)")
        params = self.place_params(params)
        mode, knobs = _mode_of(sampling), self._knobs(sampling)
        results: list[Optional[Sample]] = [None] * len(prompts)
        bar = _progress_bar(len(prompts), "sampling", self.progress if progress is None else progress)
        reuse = None
        if kv_store is not None:
            reuse = [kv_store.reusable(example_key_id(e), p) for e, p in zip(example_ids, prompts)]
        batches = self._batches(prompts, batch_size, shared_prefix, reuse=reuse)
        for groups, slots in zip(batches, self._call_slots(batches, MIN_PROMPT_BUCKET)):
            idx = [i for g in groups for i in g.rows]
            batch = self._generate_batch(params, prompts, groups, [example_key_id(example_ids[i]) for i in idx],
                                         sampling, mode, knobs, seed, kv_store, slots)
            for i, sample in zip(idx, batch):
                results[i] = sample
            bar.update(len(idx))
        bar.close()
        if kv_store is not None:
            kv_store.end_call()
        return results

    def _batches(self, prompts: list[list[int]], batch_size: int, shared_prefix: Optional[bool],
                 keys: Optional[Sequence] = None,
                 reuse: Optional[Sequence[int]] = None) -> list[list[prefix_groups.Group]]:
        """The batches a call runs, each as its groups of rows. Without sharing
        a batch is one group with an empty prefix: whole prompts, as long as
        one another (`length_sorted_batches`). `reuse` (a KVStore's reusable
        start per prompt) wins over shared prefixes where it saves more tokens;
        then every row is a group of its own, its prefix read from the store."""
        batches = None
        if self.shared_prefix if shared_prefix is None else shared_prefix:
            keys = prefix_groups.auto_keys(prompts) if keys is None else keys
            batches = prefix_groups.batches_of_groups(prompts, keys, batch_size)
        if reuse is not None:
            left = sum(map(len, prompts)) - sum(reuse)
            if left < (sum(prefix_groups.tokens_to_run(b) for b in batches) if batches
                       else sum(map(len, prompts))):
                order = sorted(range(len(prompts)), key=lambda i: reuse[i] - len(prompts[i]))
                return [[prefix_groups.Group(prompts[i][:reuse[i]], [i], [prompts[i][reuse[i]:]], stored=True)
                         for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
        if batches is not None:
            return batches
        return [[prefix_groups.Group([], [int(i) for i in idx], [prompts[i] for i in idx])]
                for idx in length_sorted_batches([len(p) for p in prompts], batch_size)]

    @staticmethod
    def _shares(groups: Sequence[prefix_groups.Group]) -> bool:
        """Whether a batch runs with prefixes (shared or stored), not whole rows."""
        return groups[0].stored or any(g.prefix and len(g.rows) > 1 for g in groups)

    @staticmethod
    def _prefix_widths(groups: Sequence[prefix_groups.Group], min_width: int) -> tuple[int, int]:
        """(prefix width, suffix width) of a batch that runs with prefixes."""
        return (width_bucket(max(max(len(g.prefix) for g in groups), 1), min_width),
                width_bucket(max(len(s) for g in groups for s in g.suffixes), min_width))

    def _call_slots(self, batches, min_width: int) -> list[int]:
        """Per batch, the prompt slots (prefix + suffix width) to pad its
        prefix to, so that a call's batches of one row count share one decode
        program (its shape is rows x slots). Padding a prefix computes little
        (it runs once per group, or not at all when stored) but every decode
        step reads the padded slots, so only batches that can share a program
        are padded: those with prefixes and the full row count, two or more."""
        rows = [bucket(sum(len(g.rows) for g in b), self.batch_multiple) for b in batches]
        alike = [i for i, b in enumerate(batches) if rows[i] == rows[0] and self._shares(b)]
        if len(alike) < 2:
            return [0] * len(batches)
        slots = max(sum(self._prefix_widths(batches[i], min_width)) for i in alike)
        return [slots if i in alike else 0 for i in range(len(batches))]

    def _prompt_arrays(self, groups: Sequence[prefix_groups.Group], rows: int, min_width: int,
                       stored: Optional[list] = None, slots: int = 0) -> dict:
        """A batch's prompts in one of `_run_prompts`' layouts, padded to `rows`
        rows: whole rows unless some group of two or more shares a prefix, or
        the prefixes' keys and values are `stored` (one per group, a group per
        row). With prefixes, the prefix is padded so that it and the suffix
        fill at least `slots` slots (`_call_slots`)."""
        put = self._put_batch
        if self._shares(groups):
            prefix_width, suffix_width = self._prefix_widths(groups, min_width)
            prefix_width = max(prefix_width, slots - suffix_width)
        if stored is not None:
            width = prefix_width
            suffixes = [g.suffixes[0] for g in groups]
            suffix, suffix_mask = left_pad(suffixes, rows, suffix_width, self.pad_id)
            prefix_mask = np.zeros((rows, width), bool)
            for r, g in enumerate(groups):
                prefix_mask[r, width - len(g.prefix):] = bool(g.prefix)
            kv = kv_store_lib.prefix_arrays(stored, rows, width, self.config.scan_layers)
            return {"prefix_kv": self._put_cache(kv), "prefix_mask": put(prefix_mask), "suffix": put(suffix),
                    "suffix_mask": put(suffix_mask), "group": put(np.arange(rows, dtype=np.int32))}
        if not self._shares(groups):
            whole = [g.prefix + s for g in groups for s in g.suffixes]
            tokens, mask = left_pad(whole, rows, width_bucket(max(map(len, whole)), min_width), self.pad_id)
            return {"tokens": put(tokens), "mask": put(mask)}
        num_groups = bucket(len(groups), self.batch_multiple)
        # An empty prefix still needs one (masked) slot to write.
        prefixes = [g.prefix or [self.pad_id] for g in groups]
        prefix, prefix_mask = left_pad(prefixes, num_groups, prefix_width, self.pad_id)
        for r, g in enumerate(groups):
            prefix_mask[r] &= bool(g.prefix)
        suffixes = [s for g in groups for s in g.suffixes]
        suffix, suffix_mask = left_pad(suffixes, rows, suffix_width, self.pad_id)
        group = np.zeros((rows,), np.int32)
        group[:len(suffixes)] = [gi for gi, g in enumerate(groups) for _ in g.rows]
        return {"prefix": put(prefix), "prefix_mask": put(prefix_mask), "suffix": put(suffix),
                "suffix_mask": put(suffix_mask), "group": put(group)}

    def _put_cache(self, kv: dict):
        """Host cache arrays on the device, or split over the mesh as the cache is."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, kv)
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(self.mesh, shd.spec_for(
            x.shape, self.trunk.cache_names, self.mesh, self.rules))), kv)

    def _generate_batch(self, params, prompts, groups, row_ids, sampling: SamplingParams, mode: Mode,
                        knobs: dict, seed: int, kv_store: Optional[kv_store_lib.KVStore] = None,
                        slots: int = 0) -> list[Sample]:
        idx = [i for g in groups for i in g.rows]
        n, rows = len(idx), bucket(len(idx), self.batch_multiple)
        ids_b = np.zeros((rows,), np.uint32)
        ids_b[:n] = row_ids
        put = self._put_batch
        stored = None
        if groups[0].stored:
            stored = [kv_store.prefix(key, len(g.prefix)) if g.prefix else None
                      for key, g in zip(row_ids, groups)]
            if all(p is None for p in stored):
                stored, groups = None, [prefix_groups.Group([], idx, [prompts[i] for i in idx])]
        state = _prefill(self.trunk, params,
                         self._prompt_arrays(groups, rows, MIN_PROMPT_BUCKET, stored, slots),
                         put(ids_b), put(np.arange(rows) < n), np.uint32(seed % (1 << 32)), knobs,
                         gen_width=bucket(sampling.max_new_tokens, MIN_GEN_BUCKET), mode=mode,
                         pad_id=self.pad_id)
        interval = self.stop_check_interval if sampling.stop_strings else sampling.max_new_tokens
        stopped = np.zeros((rows,), bool)  # rows the host found a stop string in
        step = 1
        while step < sampling.max_new_tokens:
            limit = min(step + interval, sampling.max_new_tokens)
            state = _decode(self.trunk, params, state, np.int32(limit), put(stopped), knobs, mode=mode,
                            pad_id=self.pad_id)
            new_step = int(processes.to_host(state["step"]))
            self.decode_steps += new_step - step
            if new_step < limit:  # the loop exited early: every row is done
                break
            step = new_step
            if sampling.stop_strings:
                tokens, num = processes.to_host(state["tokens"]), processes.to_host(state["num_tokens"])
                done = processes.to_host(state["done"])
                for r in range(n):
                    if not done[r] and find_stop(self._text(tokens[r, :num[r]]),
                                                 sampling.stop_strings) is not None:
                        stopped[r] = True
        tokens, logprobs = processes.to_host(state["tokens"]), processes.to_host(state["logprobs"])
        num = processes.to_host(state["num_tokens"])
        if kv_store is not None:
            key_mask = processes.to_host(state["key_mask"])
            kv_store_lib.store_rows(kv_store, state["cache"], self.config.scan_layers, row_ids,
                                    [prompts[i] for i in idx], tokens, num, key_mask,
                                    key_mask.shape[1] - tokens.shape[1])
        stop_ids = set(int(t) for t in knobs["stop_ids"] if t >= 0)
        return [self._finish(prompts[i], tokens[r, :num[r]], logprobs[r, :num[r]], stop_ids,
                             sampling.stop_strings) for r, i in enumerate(idx)]

    def _finish(self, prompt, tokens, logprobs, stop_ids, stop_strings) -> Sample:
        """Text, finish reason and the cut at the earliest stop string."""
        reason = "eos" if len(tokens) and int(tokens[-1]) in stop_ids else "length"
        text = self._text(tokens)
        cut = find_stop(text, stop_strings) if stop_strings else None
        if cut is not None:
            keep = tokens_within(tokens, text[:cut], self._text)
            tokens, logprobs = tokens[:keep], logprobs[:keep]
            text, reason = self._text(tokens), "stop_string"
        return Sample(text=text, tokens=np.asarray(tokens, np.int32),
                      logprobs=np.asarray(logprobs, np.float32),
                      prompt_tokens=np.asarray(prompt, np.int32), finish_reason=reason)

    def _text(self, tokens) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

    # -- scoring

    def score(self, params, prompts: Sequence[Prompt], continuations: Sequence[Prompt],
              batch_size: int = 8, progress: bool = False,
              shared_prefix: Optional[bool] = None) -> list[np.ndarray]:
        """log p(continuation[j] | prompt, continuation[:j]) for each pair: a list
        of float32 arrays in input order, one forward pass per batch (starts the
        prompts share computed once with `shared_prefix`)."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        prompts = [self.encode(p) for p in prompts]
        conts = [self.encode(c) for c in continuations]
        for i, (p, c) in enumerate(zip(prompts, conts)):
            if not p:
                raise ValueError(f"prompt {i} is empty; scoring needs a token before the continuation")
            if len(p) + len(c) > self.config.max_seq_len:
                raise ValueError(f"prompt {i} with its continuation has {len(p) + len(c)} tokens, "
                                 f"more than the model's context of {self.config.max_seq_len}")
        bar = _progress_bar(len(prompts), "scoring", progress)
        placed = self.place_params(params)
        if not (self.shared_prefix if shared_prefix is None else shared_prefix):
            logp_rows = batched_forward(
                lambda tokens, mask: _score(self.trunk, placed, {"tokens": tokens, "mask": mask}),
                [p + c for p, c in zip(prompts, conts)], batch_size=batch_size,
                min_width=MIN_PROMPT_BUCKET, max_width=self.config.max_seq_len, pad_id=self.pad_id,
                mesh=self.mesh, rules=self.rules, on_batch=bar.update)
            bar.close()
            # The log-prob at t is of token t + 1: a continuation starts at len(prompt) - 1.
            return [logp[len(p) - 1:len(p) - 1 + len(c)].astype(np.float32)
                    for logp, p, c in zip(logp_rows, prompts, conts)]
        # Groups by the prompts alone, so every suffix holds the prompt's last
        # token; the suffixes are left-padded, so a continuation ends each row.
        out = [None] * len(prompts)
        for groups in self._batches(prompts, batch_size, True):
            for g in groups:
                g.suffixes = [s + conts[i] for s, i in zip(g.suffixes, g.rows)]
            idx = [i for g in groups for i in g.rows]
            logp = processes.to_host(_score(self.trunk, placed, self._prompt_arrays(
                groups, bucket(len(idx), self.batch_multiple), MIN_PROMPT_BUCKET)))
            for r, i in enumerate(idx):
                out[i] = logp[r, logp.shape[1] - len(conts[i]):].astype(np.float32)
            bar.update(len(idx))
        bar.close()
        return out

    def next_token_logprobs(self, params, prompts: Sequence[Prompt], token_ids: Sequence[int], *,
                            batch_size: int = 8, keys: Optional[Sequence] = None,
                            min_width: int = MIN_PROMPT_BUCKET, on_batch=None) -> np.ndarray:
        """[N, K] log p(token_ids[k] | prompt n): one forward pass per batch,
        logits only at each prompt's end (multiple-choice options). `keys`
        (one per prompt) name the groups whose common start is computed once;
        None runs whole prompts."""
        prompts = [self.encode(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) > self.config.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's context of "
                                 f"{self.config.max_seq_len}")
        placed, tokens_k = self.place_params(params), jnp.asarray(token_ids, jnp.int32)
        out = np.zeros((len(prompts), len(token_ids)), np.float32)
        for groups in self._batches(prompts, batch_size, keys is not None, keys):
            idx = [i for g in groups for i in g.rows]
            arrays = self._prompt_arrays(groups, bucket(len(idx), self.batch_multiple), min_width)
            out[idx] = processes.to_host(_next_token_logprobs(self.trunk, placed, arrays, tokens_k))[:len(idx)]
            if on_batch is not None:
                on_batch(len(idx))
        return out


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="prompt")
