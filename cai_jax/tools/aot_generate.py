"""The sampler's generation as ahead-of-time phases, and the bounds on its time.

`inference/sampling.py` answers a batch of prompts with two compiled
functions: `_prefill` (the prompts in one forward pass into a new KV cache,
and each row's first token) and `_decode` (a while loop of one-token steps
over the donated cache). `generate_phases` builds both as the sampler calls
them on a mesh: its own trunk (`Sampler(...).trunk`: the Flax model, layers
unrolled, cache sharded by batch and KV heads), the parameters as
`Sampler.place_params` hands them over, whole left-padded prompts
(`_prompt_arrays` without shared prefixes), and the shapes its buckets round
to: rows to a power of two (at least the mesh's batch multiple), prompt width
by `width_bucket`, generation width to a power of two.

The workload comes from the stage section that generates (`workload_for`):
  ppo          rollout_batch_size prompts per iteration, sample_batch_size per
               sampler call, max_prompt_tokens + max_new_tokens, the policy's dtype
  sl_generate  batch_size rows (or config.sampling's), the longest of its three
               max_new_tokens; prompts up to the model's context (few-shot
               transcripts have no other limit)
  pairs        batch_size rows, max_prompt_tokens, max_new_tokens

Bounds, per sampler call:
  prefill  FLOPs / (chips x peak): the layers over every prompt slot, the LM
           head at each row's last token only
  decode   max_new_tokens - 1 steps (prefill picks the first token), each at
           least the largest of
             HBM:          the bytes a step reads per chip / HBM bandwidth: the
                           weights it multiplies by, in the narrower of their
                           stored and compute dtype (XLA hoists the cast out of
                           the loop), and the whole KV cache (attention runs
                           over every slot, masked)
             compute:      its FLOPs / peak
             interconnect: the collectives in the compiled loop body / ICI
                           bandwidth (read from the compiled program)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from cai_jax import sharding as shd
from cai_jax.inference import sampling
from cai_jax.inference.sampling_buckets import bucket, width_bucket
from cai_jax.inference.trunks.base import HEAD_VD
from cai_jax.inference.trunks.flax_model import FlaxModelTrunk
from cai_jax.models.config import TransformerConfig
from cai_jax.tools import tpu_specs
from cai_jax.tools.aot_phase import (Phase, abstract_array, abstract_params_sharded, attention_flops,
                                     bytes_per_chip, matmul_weights, section_of)

GENERATE_SECTIONS = ("ppo", "sl_generate", "pairs")
STOP_ID_SLOTS = 4  # Sampler._knobs pads the stop ids to bucket(n, 4): 4 for every tokenizer here


@dataclasses.dataclass(frozen=True)
class GenerateWorkload:
    """What one call of a generating stage asks of the sampler."""

    section: str
    rows: int  # prompts answered per call (PPO: one rollout)
    batch_size: int  # rows per sampler batch
    prompt_tokens: int  # the longest prompt
    answer_tokens: int  # max_new_tokens
    temperature: float
    top_k: int
    top_p: float

    @property
    def mode(self) -> sampling.Mode:
        """Which sampling filters are compiled in (their values are traced)."""
        return sampling._mode_of(sampling.SamplingParams(self.temperature, self.top_k, self.top_p))


def workload_for(config, section: str, model_cfg: TransformerConfig,
                 prompt_tokens: Optional[int] = None) -> GenerateWorkload:
    """The generation workload of `config`'s `section` (see the module
    docstring); `prompt_tokens` replaces the section's longest prompt."""
    if section not in GENERATE_SECTIONS:
        raise ValueError(f"--section is {section!r}; generation runs in {GENERATE_SECTIONS}")
    sampling_defaults = config.sampling
    if section == "ppo":
        c = section_of(config, "ppo")
        rows, batch, answer = c.rollout_batch_size, c.sample_batch_size, c.max_new_tokens
        prompt, knobs = c.max_prompt_tokens, (c.temperature, c.top_k, c.top_p)
    elif section == "sl_generate":
        from cai_jax.sl_cai.generate import StepSettings
        s = StepSettings.from_config(section_of(config, "sl_generate"), sampling_defaults)
        rows = batch = s.batch_size
        answer = max(s.answer_max_new_tokens, s.critique_max_new_tokens, s.revision_max_new_tokens)
        prompt, knobs = model_cfg.max_seq_len - answer, (s.temperature, s.top_k, s.top_p)
    else:
        c = section_of(config, "pairs")
        rows = batch = c.batch_size or sampling_defaults.batch_size
        answer = c.max_new_tokens or sampling_defaults.max_new_tokens
        prompt = min(c.max_prompt_tokens, model_cfg.max_seq_len - answer)
        knobs = (c.temperature, sampling_defaults.top_k, sampling_defaults.top_p)
    prompt = prompt_tokens or prompt
    if prompt < 1 or prompt + answer > model_cfg.max_seq_len:
        raise ValueError(f"{section}: prompts of {prompt} tokens plus {answer} new tokens do not fit the "
                         f"model's context of {model_cfg.max_seq_len}")
    return GenerateWorkload(section, rows, batch, prompt, answer, *knobs)


@dataclasses.dataclass(frozen=True)
class GeneratePlan:
    """The compiled shapes of one sampler batch, and what the bounds need."""

    workload: GenerateWorkload
    rows: int  # compiled rows per batch
    batches: int  # sampler batches per stage call
    prompt_width: int
    gen_width: int
    weights: dict  # the parameters as the compiled functions take them
    cache: dict  # the KV cache (abstract, sharded)
    copies_weights: bool  # the sampler runs on its own copy of the weights (another layer layout)
    model_config: TransformerConfig  # the sampler's

    @property
    def decode_steps(self) -> int:
        return self.workload.answer_tokens - 1

    def prefill_flops(self) -> float:
        cfg, rows, width = self.model_config, self.rows, self.prompt_width
        head = cfg.d_model * cfg.vocab_size
        return (2.0 * rows * width * (matmul_weights(cfg) - head) + 2.0 * rows * head
                + attention_flops(cfg, rows, width))

    def decode_step_flops(self) -> float:
        """One token per row through every weight, attending to every cache slot."""
        cfg, slots = self.model_config, self.prompt_width + self.gen_width
        return self.rows * (2.0 * matmul_weights(cfg) + 4.0 * cfg.num_layers * slots * cfg.num_heads
                            * cfg.head_dim)

    def decode_step_weight_bytes(self) -> int:
        """Per chip: the weights one decode step multiplies by, in the narrower
        of their stored and compute dtype. Lookup tables (the embedding of an
        untied model, GPT-2's positions) give only the rows' entries, and the
        Flax trunk reads an untied head from its [V, D] copy, not `lm_head`."""
        cfg = self.model_config
        skip = {"pos_embed", "lm_head"} | (set() if cfg.tie_embeddings else {"embed"})
        compute_size = jnp.dtype(cfg.compute_dtype).itemsize
        total = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.weights)[0]:
            if path[0].key in skip:
                continue
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += math.prod(shard) * min(leaf.dtype.itemsize, compute_size)
        return total

    def decode_step_bytes(self) -> int:
        return self.decode_step_weight_bytes() + bytes_per_chip(self.cache)


def sampler_for(model_cfg: TransformerConfig, mesh) -> sampling.Sampler:
    """The sampler a stage builds for this model on this mesh (no tokenizer:
    nothing here decodes text)."""
    sampler = sampling.Sampler(model_cfg.replace(heads=("lm",)), None, mesh=mesh, progress=False)
    if not isinstance(sampler.trunk, FlaxModelTrunk):
        raise ValueError(f"the sampler runs the {sampler.trunk.name} trunk on a mesh of {mesh.size} device; "
                         "ahead-of-time compiles model the Flax trunk, which it runs on several chips")
    return sampler


def sampler_weights(sampler: sampling.Sampler) -> dict:
    """What `FlaxModelTrunk.place_params` returns, as abstract arrays: the
    parameters in the sampler's (unrolled) layout placed by
    `sharding.param_shardings`, and an untied head's [V, D] copy."""
    cfg, mesh = sampler.config, sampler.mesh
    weights = abstract_params_sharded(cfg, mesh, sampler.rules)
    if not cfg.tie_embeddings:
        shape = (cfg.vocab_size, cfg.d_model)
        spec = shd.spec_for(shape, ("vocab", "embed"), mesh, sampler.rules)
        weights[HEAD_VD] = abstract_array(shape, cfg.weight_dtype, NamedSharding(mesh, spec))
    return weights


def _rows_array(shape, dtype, mesh, rules):
    """An abstract per-row array, split over the mesh's batch axes as the sampler puts it."""
    return abstract_array(shape, dtype, shd.data_sharding(mesh, len(shape), rules))


def generate_phases(model_cfg: TransformerConfig, workload: GenerateWorkload, mesh, holder: str,
                    holder_scans_layers: bool, shared_prefix: bool = False) -> tuple[list[Phase], GeneratePlan]:
    """Prefill and decode of one sampler batch. `holder` names the resident
    state that holds the model's weights between calls (in the layout
    `holder_scans_layers` says); when the sampler's layout differs it runs on
    a copy, which lives only while it generates. With `shared_prefix` (the
    stage's config.sampling.shared_prefix) also the sampler's shared-prefix
    layout at its largest (`shared_prefix_phases`); the time bounds stay
    those of whole prompts."""
    sampler = sampler_for(model_cfg, mesh)
    trunk, rules = sampler.trunk, sampler.rules
    rows = bucket(min(workload.batch_size, workload.rows), sampler.batch_multiple)
    width = width_bucket(workload.prompt_tokens, sampling.MIN_PROMPT_BUCKET)
    gen_width = bucket(workload.answer_tokens, sampling.MIN_GEN_BUCKET)
    weights = sampler_weights(sampler)
    copies = holder_scans_layers != sampler.config.scan_layers
    uses = () if copies else (holder,)

    data = functools.partial(_rows_array, mesh=mesh, rules=rules)
    scalar = lambda dtype: abstract_array((), dtype, shd.replicated(mesh))  # noqa: E731
    knobs = {"temperature": scalar(jnp.float32), "top_k": scalar(jnp.int32), "top_p": scalar(jnp.float32),
             "stop_ids": abstract_array((STOP_ID_SLOTS,), jnp.int32, shd.replicated(mesh))}
    prompt = {"tokens": data((rows, width), jnp.int32), "mask": data((rows, width), jnp.bool_)}
    statics = {"mode": workload.mode, "pad_id": 0}
    prefill_args = (trunk, weights, prompt, data((rows,), jnp.uint32), data((rows,), jnp.bool_),
                    scalar(jnp.uint32), knobs)
    state = _decode_state(trunk, prefill_args, dict(statics, gen_width=gen_width))
    plan = GeneratePlan(workload, rows, -(-workload.rows // workload.batch_size), width, gen_width,
                        weights, state["cache"], copies, sampler.config)
    phases = [
        Phase("prefill", sampling._prefill, prefill_args, uses, plan.prefill_flops(), plan.prefill_flops(),
              kwargs=dict(statics, gen_width=gen_width), generation=True),
        Phase("decode", sampling._decode,
              (trunk, weights, state, scalar(jnp.int32), data((rows,), jnp.bool_), knobs), uses,
              plan.decode_steps * plan.decode_step_flops(), plan.decode_steps * plan.decode_step_flops(),
              kwargs=statics, generation=True, count_loop_collectives=True),
    ]
    if shared_prefix:
        phases += shared_prefix_phases(plan, trunk, prefill_args, statics, uses)
    return phases, plan


def shared_prefix_phases(plan: GeneratePlan, trunk, prefill_args: tuple, statics: dict,
                         uses: tuple) -> list[Phase]:
    """Prefill and decode in the sampler's shared-prefix layout (`_run_prompts`:
    each group's prefix once, then every row's suffix over a copy of its
    group's cache), compiled at the largest shapes a batch can take, so that
    the memory check covers it: `Sampler._prefix_widths` pads prefixes and
    suffixes each to the longest of its batch, so a batch mixing a group with
    a long prefix and one with a long suffix holds prompt + prompt slots, twice
    the whole layout's, with one group per row at most."""
    rows, width, gen_width = plan.rows, plan.prompt_width, plan.gen_width
    _, weights, _, row_ids, active, seed, knobs = prefill_args
    mesh, rules = trunk.mesh, trunk.rules
    data = functools.partial(_rows_array, mesh=mesh, rules=rules)
    prompt = {"prefix": data((rows, width), jnp.int32), "prefix_mask": data((rows, width), jnp.bool_),
              "suffix": data((rows, width), jnp.int32), "suffix_mask": data((rows, width), jnp.bool_),
              "group": data((rows,), jnp.int32)}
    args = (trunk, weights, prompt, row_ids, active, seed, knobs)
    state = _decode_state(trunk, args, dict(statics, gen_width=gen_width))
    doubled = dataclasses.replace(plan, prompt_width=2 * width)
    return [
        Phase("prefill_shared", sampling._prefill, args, uses, 2 * plan.prefill_flops(), 2 * plan.prefill_flops(),
              kwargs=dict(statics, gen_width=gen_width), generation=True),
        Phase("decode_shared", sampling._decode,
              (trunk, weights, state, abstract_array((), jnp.int32, shd.replicated(mesh)), data((rows,), jnp.bool_),
               knobs), uses,
              plan.decode_steps * doubled.decode_step_flops(), plan.decode_steps * doubled.decode_step_flops(),
              kwargs=statics, generation=True),
    ]


def _decode_state(trunk, prefill_args, prefill_statics) -> dict:
    """The state prefill hands decode, as abstract arrays: the cache sharded
    as the trunk constrains it, per-row arrays over the batch axes (as the
    compiled prefill lays them out), the step counter replicated."""
    shapes = jax.eval_shape(lambda *a: sampling._prefill(trunk, *a, **prefill_statics), *prefill_args[1:])
    mesh, rules = trunk.mesh, trunk.rules

    def place(path, leaf):
        if path[0].key == "cache":
            sharding = NamedSharding(mesh, shd.spec_for(leaf.shape, trunk.cache_names, mesh, rules))
        elif leaf.ndim == 0:
            sharding = shd.replicated(mesh)
        else:
            sharding = shd.data_sharding(mesh, leaf.ndim, rules)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)  # dtype may be a PRNG key

    return jax.tree_util.tree_map_with_path(place, shapes)


# ---------------------------------------------------------------- the compiled loop's collectives

_COLLECTIVE = re.compile(r"^\s*%\S+ = (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|"
                         r"all-to-all)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")


def loop_collective_bytes(hlo_text: str) -> int:
    """Bytes per chip of the collectives in a compiled program's while-loop
    body (ops whose source is under `while/body`): each collective's result,
    or for an async start the largest array it carries. A rough measure of
    the interconnect traffic of one decode step."""
    total = 0
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.match(line)
        if not match or "/while/body/" not in line:
            continue
        sizes = [math.prod(int(d) for d in dims.split(",") if d) * _itemsize(kind)
                 for kind, dims in _ARRAY.findall(match.group(1))]
        tuple_result = match.group(1).startswith("(")
        total += sum(sizes) if match.group(2) == "all-reduce" or not tuple_result else max(sizes, default=0)
    return total


def _itemsize(hlo_type: str) -> int:
    if hlo_type == "pred":
        return 1
    return 2 if hlo_type == "bf16" else int(hlo_type[1:]) // 8


# ---------------------------------------------------------------- bounds

@dataclasses.dataclass
class GenerationReport:
    """Per-chip memory and time bounds of a stage call's generation."""

    section: str
    rows: int  # prompts answered per stage call
    batch_rows: int  # compiled rows per sampler batch
    batches: int
    prompt_width: int
    gen_width: int
    answer_tokens: int
    temperature: float
    weight_bytes: int  # the sampler's weights, per chip
    copies_weights: bool
    cache_bytes: int  # the KV cache, per chip
    prefill_flops: float
    prefill_seconds: float
    decode_step_flops: float
    decode_step_weight_bytes: int
    decode_step_bytes: int
    decode_step_collective_bytes: Optional[int]
    decode_step_bounds: dict  # seconds per step: "hbm", "compute", "interconnect"

    @property
    def decode_step_seconds(self) -> float:
        return max(self.decode_step_bounds.values())

    @property
    def decode_seconds(self) -> float:
        return (self.answer_tokens - 1) * self.decode_step_seconds

    @property
    def batch_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def seconds(self) -> float:
        """All of a stage call's sampler batches, one after another."""
        return self.batches * self.batch_seconds

    @property
    def tokens_per_second(self) -> float:
        """Answer tokens the slice writes per second at these bounds."""
        return self.rows * self.answer_tokens / self.seconds

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(decode_step_seconds=self.decode_step_seconds, decode_seconds=self.decode_seconds,
                   seconds=self.seconds, tokens_per_second=self.tokens_per_second)
        return out


def generation_report(plan: GeneratePlan, chip: tpu_specs.ChipSpec, chips: int,
                      collective_bytes: Optional[int]) -> GenerationReport:
    step_bytes = plan.decode_step_bytes()
    bounds = {"hbm": step_bytes / chip.hbm_bandwidth,
              "compute": plan.decode_step_flops() / (chips * chip.peak_bf16_flops)}
    if collective_bytes is not None:
        bounds["interconnect"] = collective_bytes / chip.ici_bandwidth
    w = plan.workload
    return GenerationReport(
        section=w.section, rows=w.rows, batch_rows=plan.rows, batches=plan.batches,
        prompt_width=plan.prompt_width, gen_width=plan.gen_width, answer_tokens=w.answer_tokens,
        temperature=w.temperature, weight_bytes=bytes_per_chip(plan.weights),
        copies_weights=plan.copies_weights, cache_bytes=bytes_per_chip(plan.cache),
        prefill_flops=plan.prefill_flops(),
        prefill_seconds=plan.prefill_flops() / (chips * chip.peak_bf16_flops),
        decode_step_flops=plan.decode_step_flops(), decode_step_weight_bytes=plan.decode_step_weight_bytes(),
        decode_step_bytes=step_bytes, decode_step_collective_bytes=collective_bytes,
        decode_step_bounds=bounds)
