"""Train steps against transformers + torch (issue #20, item 1).

    python benchmarks/bench_train.py                  # default run's shapes, plus 1024-token SFT and PM
    python benchmarks/bench_train.py --quick          # default shapes, one timed step a side, no 1024
    python benchmarks/bench_train.py --quick --cells sft --name run             # a run split over
    python benchmarks/bench_train.py --quick --cells pm --name run --append     # several processes
    python benchmarks/bench_train.py --config configs/tiny.py --quick --out_dir /tmp/x   # smoke test

Times, in one run, the steps the stages take on SmolLM2-135M-Instruct (the
`base` model of --config, float32):

  sft         sl_cai/sft.build_trainer's step: masked next-token loss on the answer
  pm          rl_cai/preference.build_trainer's step: soft Bradley-Terry on pairs,
              scalar head read at each row's last real token
  ppo_policy  ppo_update's policy step (clipped surrogate on the answer's log-probs)
  ppo_value   ppo_update's value step (clipped value loss, separate value trunk)
  ppo_shared  the default run's PPO step (share_trunk: policy + value_coef * value)

beside transformers + torch doing the same step on the same weights (exported
with write_hf_dir), the same batch, AdamW with the same hyper-parameters and
global-norm clipping, torch on --torch_threads threads. Shapes come from the
config's sections unless given; --long_len adds SFT and PM cells at that length.
--matmul_dtype bfloat16 times our steps with bfloat16-operand products
(model.matmul_dtype, models/matmul.py) beside torch under autocast(bfloat16).
In each round a side takes --settle_steps untimed steps before its timed
ones, so each is timed as a training loop runs it, one step after another.
Both sides use a constant learning rate (the stages' warm-up would make the
first update zero), so the loss after one update is compared as well. Like
`cai_jax.main`, the bench re-runs itself with glibc's huge-page tunable
(cai_jax/huge_pages.py), so both sides run with the allocator setting the
pipeline has; CAI_JAX_HUGE_PAGES=0 times them without. The header names the CPU
and the tunables.

A token is one position of the padded batch (rows x width, both answers of a
pair); tokens/s is tokens per step over the median step time after one
untimed step, ours and torch alternating over --repeats rounds. "% peak" is
6 x (matmul weights a token passes through) x tokens/s over the matmul peak
at --matmul_dtype measured around each cell (jitted product, best of several); attention's
score and value products are left out. The table goes to <out_dir>/<name>.md
(name: today's date), the raw numbers to <name>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CELLS = ("sft", "pm", "ppo_policy", "ppo_value", "ppo_shared")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of {', '.join(CELLS)}")
    p.add_argument("--quick", action="store_true", help="one timed step per side, one round, no long cells")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    p.add_argument("--repeats", type=int, default=2, help="rounds, ours and torch alternating")
    p.add_argument("--settle_steps", type=int, default=1,
                   help="untimed steps a side takes in each round before its timed ones: the first step "
                        "after the other side's re-faults the memory that side freed (our PM step took "
                        "17-19 s right after a torch step, 11.9 s after one of ours; docs/training-performance.md)")
    p.add_argument("--long_len", type=int, default=1024, help="also SFT and PM at this width (0: no)")
    p.add_argument("--long_sft_batch", type=int, default=2, help="SFT rows at --long_len")
    p.add_argument("--long_pm_pairs", type=int, default=1, help="PM pairs at --long_len")
    # Default-run shapes; None reads them from the config's sections.
    p.add_argument("--sft_batch", type=int)
    p.add_argument("--sft_len", type=int)
    p.add_argument("--sft_accum", type=int)
    p.add_argument("--pm_pairs", type=int)
    p.add_argument("--pm_len", type=int)
    p.add_argument("--ppo_rows", type=int)
    p.add_argument("--ppo_prompt", type=int)
    p.add_argument("--ppo_new", type=int)
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--omp_wait_policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for torch's OpenMP threads, unless already set ('' leaves "
                        "OpenMP's default: spinning, which on a shared machine made a 2-thread "
                        "torch step ~4x slower than a 1-thread one)")
    p.add_argument("--skip_torch", action="store_true", help="ours only")
    p.add_argument("--matmul_dtype", default="float32", choices=("float32", "bfloat16"),
                   help="ours: model.matmul_dtype; torch: bfloat16 runs the step under "
                        "torch.autocast(bfloat16); the peak is that dtype's product")
    p.add_argument("--peak_size", type=int, default=3072, help="side of the matmul timed for the peak")
    p.add_argument("--out_dir", default=os.path.join(REPO, "benchmarks", "results", "train"))
    p.add_argument("--name", help="file stem of the results (default: today's date)")
    p.add_argument("--append", action="store_true",
                   help="add these cells to <out_dir>/<name>.json's (a run split over processes)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.long_len = 1, 1, 0
    return args


# ------------------------------------------------------------------ shapes and batches

@dataclasses.dataclass
class Shape:
    kind: str  # one of CELLS
    rows: int  # batch rows (PM: pairs)
    width: int  # padded tokens per row (PPO: prompt + answer)
    accum: int = 1  # micro-batches per step
    answer: int = 0  # PPO: answer width

    @property
    def tokens(self) -> int:
        """Positions of the padded batch both sides compute (PM: both answers)."""
        return self.rows * self.width * (2 if self.kind == "pm" else 1)

    @property
    def label(self) -> str:
        if self.kind == "pm":
            return f"{self.rows} pair{'s' * (self.rows > 1)} x {self.width}"
        if self.answer:
            return f"{self.rows} x ({self.width - self.answer} + {self.answer})"
        return f"{self.rows} x {self.width}" + (f", {self.accum} micro-batches" if self.accum > 1 else "")


def shapes(args, config, max_len: int) -> list[Shape]:
    sl, pm, ppo = config.sl_train, config.pm_train, config.ppo
    cells = args.cells.split(",")
    bad = [c for c in cells if c not in CELLS]
    if bad:
        raise SystemExit(f"--cells: unknown {bad}; of {CELLS}")
    sft_accum = args.sft_accum or sl.grad_accum_steps
    out = []
    for kind in cells:
        if kind == "sft":
            out.append(Shape("sft", args.sft_batch or sl.batch_size,
                             min(args.sft_len or sl.max_seq_len, max_len), sft_accum))
            if args.long_len:
                out.append(Shape("sft", args.long_sft_batch, min(args.long_len, max_len),
                                 min(sft_accum, args.long_sft_batch)))
        elif kind == "pm":
            width = min(args.pm_len or pm.max_seq_len, max_len)
            out.append(Shape("pm", args.pm_pairs or pm.batch_size, width, pm.grad_accum_steps))
            if args.long_len:
                out.append(Shape("pm", args.long_pm_pairs, min(args.long_len, max_len), 1))
        else:
            prompt, new = args.ppo_prompt or ppo.max_prompt_tokens, args.ppo_new or ppo.max_new_tokens
            rows = args.ppo_rows or ppo.minibatch_size
            out.append(Shape(kind, rows, prompt + new, ppo.grad_accum_steps, new))
    return out


def random_ids(rng, n: int) -> list[int]:
    """Ordinary-token ids (as bench_sampler's prompts)."""
    return rng.integers(100, 40000, size=n).tolist()


def make_batch(shape: Shape, pad_id: int, seed: int = 0) -> dict:
    """A batch as the stage's own collate builds it: rows of random lengths up
    to the width (the longest exactly the width), padded by the project's functions."""
    rng = np.random.default_rng(seed)
    lengths = lambda n, w: [w] + rng.integers(w // 2, w + 1, size=n - 1).tolist()  # noqa: E731
    if shape.kind == "sft":
        from cai_jax.sl_cai.sft import pad_batch
        examples = []
        for n in lengths(shape.rows, shape.width):
            prompt = int(n * 0.4)  # the answer (loss-masked) is the rest
            examples.append({"tokens": np.asarray(random_ids(rng, n), np.int32),
                             "loss_mask": np.r_[np.zeros(prompt, np.int32), np.ones(n - prompt, np.int32)]})
        return pad_batch(examples, min(64, shape.width), shape.width, pad_id)
    if shape.kind == "pm":
        from cai_jax.rl_cai.preference import pair_batch
        ns = lengths(2 * shape.rows, shape.width)
        examples = [{"a": np.asarray(random_ids(rng, ns[2 * i]), np.int32),
                     "b": np.asarray(random_ids(rng, ns[2 * i + 1]), np.int32),
                     "p_a": float(rng.uniform())} for i in range(shape.rows)]
        return pair_batch(examples, min(64, shape.width), shape.width, pad_id)
    from cai_jax.rl_cai.rollout import PolicyPrompt, pack_rollout
    prompt_w = shape.width - shape.answer
    prompts = [PolicyPrompt(str(i), "red_team", (), tokens=tuple(random_ids(rng, n)))
               for i, n in enumerate(lengths(shape.rows, prompt_w))]
    samples = [types.SimpleNamespace(tokens=random_ids(rng, n), logprobs=np.zeros(n), text="",
                                     finish_reason="stop")
               for n in lengths(shape.rows, shape.answer)]
    r = pack_rollout(prompts, samples, prompt_w, shape.answer, pad_id)
    return {"tokens": r.tokens, "attention_mask": r.attention_mask, "action_mask": r.action_mask}


def fill_ppo_batch(batch: dict, logp: np.ndarray, hyper, seed: int = 0) -> dict:
    """The rollout numbers of an update batch: log-probs at rollout time (the
    policy's own, nudged so some ratios clip), values, and GAE advantages and
    returns of a score on each answer's last token (ppo_update.compute_advantages)."""
    from cai_jax.rl_cai.ppo_update import compute_advantages
    rng = np.random.default_rng(seed + 1)
    mask = batch["action_mask"]
    values = (rng.normal(0, 0.3, mask.shape) * mask).astype(np.float32)
    rewards = np.zeros(mask.shape, np.float32)
    rewards[np.arange(len(mask)), mask.sum(1).astype(int) - 1] = rng.normal(0, 1, len(mask))
    adv, ret = compute_advantages(rewards, values, mask, hyper)
    logp_old = (logp + rng.normal(0, 0.1, logp.shape)) * mask
    return {**batch, "logp_old": logp_old.astype(np.float32), "values_old": values,
            "advantages": adv.astype(np.float32), "returns": ret.astype(np.float32)}


# ------------------------------------------------------------------ ours

def scalar_head(cfg, seed: int = 0) -> dict:
    """A random (not zero) scalar head, so the first loss depends on the trunk."""
    rng = np.random.default_rng(seed)
    return {"kernel": rng.normal(0, 0.05, (cfg.d_model, 1)).astype(np.float32),
            "bias": np.full((1,), 0.1, np.float32)}


def constant_lr(section):
    """A copy of a stage section whose optimizer keeps its peak rate from step 0."""
    import ml_collections
    out = ml_collections.ConfigDict(section.to_dict())
    out.optimizer.schedule, out.optimizer.warmup_steps = "constant", 0
    return out


def our_setup(kind: str, config, shape: Shape, mesh, num_steps: int):
    """(trainer, host parameters, optimizer section) the stage would build for this
    step kind; its optimizer at a constant rate, scalar heads random."""
    from cai_jax.model_ref import resolve
    from cai_jax.rl_cai import ppo, ppo_update, preference
    from cai_jax.sl_cai import sft
    base = resolve("base", config)
    if kind == "sft":
        section = constant_lr(config.sl_train)
        section.grad_accum_steps = shape.accum
        loaded = base.load(seed=config.seed, to_device=False)
        return sft.build_trainer(loaded.config, section, mesh, num_steps), loaded.params, section.optimizer
    if kind == "pm":
        section = constant_lr(config.pm_train)
        section.grad_accum_steps = shape.accum
        loaded = preference.init_pm(config, "base")
        params = {**loaded.params, "scalar_head": scalar_head(loaded.config)}
        trainer = preference.build_trainer(loaded.config, section, mesh, num_steps)
        return trainer, jax_to_host(params), section.optimizer
    c = config.ppo
    hyper = dataclasses.replace(ppo.hyper_from_config(c), minibatch_size=shape.rows)
    heads = {"ppo_policy": ("lm",), "ppo_value": ("scalar",), "ppo_shared": ("lm", "scalar")}[kind]
    loaded = base.load({"heads": heads, "dtype": c.dtype}, seed=config.seed, to_device=False)
    params = dict(loaded.params)
    if "scalar" in heads:
        params["scalar_head"] = scalar_head(loaded.config)
    lm_cfg = loaded.config.replace(heads=("lm",))
    if kind == "ppo_value":  # a separate value trunk: the policy trainer is not used
        steps = ppo_update.build_ppo_steps(mesh=mesh, hyper=hyper, policy_config=lm_cfg,
                                           policy_optimizer=c.policy_optimizer, value_config=loaded.config,
                                           value_optimizer=c.value_optimizer, num_steps=num_steps)
        return steps.value, params, c.value_optimizer
    steps = ppo_update.build_ppo_steps(mesh=mesh, hyper=hyper, policy_config=loaded.config,
                                       policy_optimizer=c.policy_optimizer,
                                       value_config=None if kind == "ppo_shared" else lm_cfg,
                                       value_optimizer=c.value_optimizer, num_steps=num_steps)
    return steps.policy, params, c.policy_optimizer


def jax_to_host(tree):
    import jax
    return jax.tree.map(np.asarray, tree)


def rollout_logp(config, params, batch, answer: int) -> np.ndarray:
    """The policy's log-probs of the answer tokens (ppo_update.answer_outputs, as
    the rollout scorer computes them with recompute_logprobs)."""
    import flax.linen as nn
    import jax
    from cai_jax import sharding as shd
    from cai_jax.models.transformer import Transformer
    from cai_jax.rl_cai.ppo_update import answer_outputs

    model = Transformer(config)

    @jax.jit
    def logp(p, tokens, mask):
        with nn.logical_axis_rules(shd.DEFAULT_RULES):
            return answer_outputs(model, p, tokens, mask, answer, 1.0)["logp"]
    return np.asarray(logp(params, batch["tokens"], batch["attention_mask"]))


class OurStep:
    """trainer.train_step on a fixed batch; each call is one step, state carried."""

    def __init__(self, trainer, params, batch):
        import jax
        self.trainer, self.rng = trainer, jax.random.key(0)
        self.batch = jax.device_put(batch, trainer.batch_sharding)
        self.state = trainer.init_state(params)

    def __call__(self) -> float:
        import jax
        self.state, metrics = self.trainer.train_step(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])


# ------------------------------------------------------------------ torch

class TorchStep:
    """The same step in transformers + torch: the exported model's trunk, the
    tied LM head and/or a linear scalar head with our initial values, AdamW
    with the optimizer section's numbers and global-norm clipping."""

    def __init__(self, kind, hf_dir, params, batch, opt_cfg, hyper, accum: int, autocast_bf16: bool = False):
        import torch
        self.autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast_bf16
                         else contextlib.nullcontext)
        from transformers import AutoModelForCausalLM
        self.torch, self.kind, self.hyper, self.accum = torch, kind, hyper, accum
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
        trainable = list(self.model.parameters() if kind in ("sft", "ppo_policy", "ppo_shared")
                         else self.model.model.parameters())
        self.head = None
        if "scalar_head" in params:
            d = params["scalar_head"]["kernel"].shape[0]
            self.head = torch.nn.Linear(d, 1)
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(np.asarray(params["scalar_head"]["kernel"]).T))
                self.head.bias.copy_(torch.from_numpy(np.asarray(params["scalar_head"]["bias"])))
            trainable += list(self.head.parameters())
        self.params = trainable
        self.clip = opt_cfg.get("grad_clip_norm") or 0.0
        # fused: the single-tensor default took 3-4x longer per update here.
        self.opt = torch.optim.AdamW(trainable, lr=opt_cfg["learning_rate"], eps=opt_cfg["eps"],
                                     betas=(opt_cfg["b1"], opt_cfg["b2"]),
                                     weight_decay=opt_cfg["weight_decay"], fused=True)
        self.batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        for k in ("tokens", "attention_mask", "mask"):
            if k in self.batch:
                self.batch[k] = self.batch[k].long()

    def trunk(self, tokens, mask):
        """Final-norm hidden states, positions counted from each row's first real token."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.model(input_ids=tokens, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state

    def loss_sum(self, b):
        """The summed loss of one micro-batch: the project's loss_fn, in torch."""
        F = self.torch.nn.functional
        if self.kind == "sft":
            logits = self.model.lm_head(self.trunk(b["tokens"], b["attention_mask"])[:, :-1])
            labels = b["tokens"][:, 1:].masked_fill(b["loss_mask"][:, 1:] == 0, -100)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        if self.kind == "pm":
            n, _, t = b["tokens"].shape
            mask = b["mask"].reshape(2 * n, t)
            hidden = self.trunk(b["tokens"].reshape(2 * n, t), mask)
            last = t - 1 - mask.flip(-1).argmax(-1)  # each row's last real token
            scores = self.head(hidden[self.torch.arange(2 * n), last])[:, 0].reshape(n, 2)
            d = scores[:, 0] - scores[:, 1]
            per_pair = -(b["p_a"] * F.logsigmoid(d) + (1 - b["p_a"]) * F.logsigmoid(-d))
            w = b["weight"]
            return self.torch.where(w > 0, per_pair * w, 0.0).sum()
        h = self.hyper
        t, answer = b["tokens"].shape[1], b["action_mask"].shape[1]
        full = self.trunk(b["tokens"], b["attention_mask"])
        answer_slice = slice(t - answer - 1, t - 1)  # the positions that predict the answer
        hidden = full[:, answer_slice]
        mask = b["action_mask"]
        total = 0.0
        if self.kind in ("ppo_policy", "ppo_shared"):
            # Logits at every position, then sliced, as answer_outputs does (and
            # TRL): the head over the prompt is wasted work on both sides.
            logits = self.model.lm_head(full)[:, answer_slice]
            logp_all = F.log_softmax(logits / h.temperature, -1)
            logp = logp_all.gather(-1, b["tokens"][:, t - answer:, None])[..., 0]
            ratio = (logp - b["logp_old"]).exp()
            per_token = self.torch.maximum(-b["advantages"] * ratio,
                                           -b["advantages"] * ratio.clamp(1 - h.clip_eps, 1 + h.clip_eps))
            total = (per_token * mask).sum()
            if h.entropy_coef:
                total = total - h.entropy_coef * (-(logp_all.exp() * logp_all).sum(-1) * mask).sum()
            else:
                with self.torch.no_grad():  # ours reports it; with coefficient 0 it is a metric only
                    (-(logp_all.exp() * logp_all).sum(-1) * mask).sum()
        if self.kind in ("ppo_value", "ppo_shared"):
            values = self.head(hidden)[..., 0]
            v_clip = b["values_old"] + (values - b["values_old"]).clamp(-h.value_clip_eps, h.value_clip_eps)
            per_token = 0.5 * self.torch.maximum((values - b["returns"]) ** 2, (v_clip - b["returns"]) ** 2)
            v_sum = (per_token * mask).sum()
            total = total + (h.value_coef * v_sum if self.kind == "ppo_shared" else v_sum)
        return total

    def denominator(self) -> float:
        """What train_step divides the step's summed loss and gradients by."""
        b = self.batch
        if self.kind == "sft":
            return float(b["loss_mask"][:, 1:].sum())
        return float(b["weight"].sum() if self.kind == "pm" else b["action_mask"].sum())

    def __call__(self) -> float:
        """One optimizer step: a backward per micro-batch (each one's activations
        freed before the next), gradients summed and divided by the step's denominator."""
        self.opt.zero_grad(set_to_none=True)
        denom, total = max(self.denominator(), 1e-9), 0.0
        for i in range(self.accum):
            with self.autocast():
                s = self.loss_sum({k: v.chunk(self.accum)[i] for k, v in self.batch.items()})
            (s / denom).backward()
            total += s.item()
        if self.clip:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return total / denom


# ------------------------------------------------------------------ arithmetic

def best_of(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `fn`, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_gflops(n: int, repeats: int = 5, matmul_dtype: str = "float32") -> float:
    """GFLOP/s of a jitted n x n product at `matmul_dtype` (models/matmul.py),
    best of `repeats`."""
    import jax
    import jax.numpy as jnp
    from cai_jax.models import matmul
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    # Operands stored as the products read them (rounded ahead, as the sampler's weights are).
    a, b = matmul.stored_operand(a, matmul_dtype), matmul.stored_operand(b, matmul_dtype)
    dot = jax.jit(lambda a, b: matmul.einsum("ij,jk->ik", a, b, matmul_dtype))
    return 2 * n ** 3 / best_of(lambda: dot(a, b).block_until_ready(), repeats) / 1e9


def torch_matmul_gflops(n: int, repeats: int = 5) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / best_of(lambda: torch.mm(a, b), repeats) / 1e9


def matmul_params(cfg) -> tuple[int, int]:
    """(trunk, LM head) weights one token's products use; norms, embedding
    lookup and attention's score and value products are not matmuls with weights."""
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = (3 if cfg.arch == "llama" else 2) * cfg.d_model * cfg.mlp_dim
    return cfg.num_layers * (attn + mlp), cfg.vocab_size * cfg.d_model


def step_flops(shape: Shape, cfg) -> float:
    """6 x weights x tokens, forward and backward: the trunk over every position,
    the LM head over the positions the loss reads (SFT: all but the last; PPO:
    the answer's), the scalar head not at all (d_model weights)."""
    trunk, head = matmul_params(cfg)
    head_tokens = {"sft": shape.rows * (shape.width - 1), "ppo_policy": shape.rows * shape.answer,
                   "ppo_shared": shape.rows * shape.answer}.get(shape.kind, 0)
    return 6.0 * (trunk * shape.tokens + head * head_tokens)


def summarize(cell: dict) -> dict:
    """Medians, tokens/s, ratio, fraction of the matmul peak and loss agreement of a timed cell."""
    out = dict(cell)
    peak = max(cell["peak_gflops"]) * 1e9
    for side, times in cell["seconds"].items():
        med = statistics.median(times)
        out.update({f"{side}_median_s": med, f"{side}_tokens_per_s": cell["tokens"] / med,
                    f"{side}_peak_fraction": cell["flops"] / med / peak})
    if "torch" in cell["seconds"]:
        out["ratio"] = out["ours_tokens_per_s"] / out["torch_tokens_per_s"]
        for i, name in enumerate(("first", "second")):
            a, b = cell["losses"]["ours"][i], cell["losses"]["torch"][i]
            out[f"{name}_loss_abs_diff"] = abs(a - b)
            out[f"{name}_loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
    return out


# ------------------------------------------------------------------ one cell

def run_cell(shape: Shape, args, config, mesh, hf_dir, pad_id: int) -> dict:
    """Both sides' steps on one batch: the first (ours compiles) untimed, its loss
    compared; then --repeats rounds of --steps timed steps a side, alternating.
    The first timed step runs on the same batch after one update: its loss is
    compared too. The matmul peak is measured right before and after."""
    from cai_jax.rl_cai import ppo
    cell = {"kind": shape.kind, "shape": shape.label, "tokens": shape.tokens,
            "peak_gflops": [matmul_peak_gflops(args.peak_size, matmul_dtype=args.matmul_dtype)],
            "load": [os.getloadavg()[0]]}
    trainer, params, opt_cfg = our_setup(shape.kind, config, shape, mesh, num_steps=100)
    cell["flops"] = step_flops(shape, trainer.model_config)
    batch = make_batch(shape, pad_id)
    hyper = None
    if shape.kind.startswith("ppo"):
        hyper = ppo.hyper_from_config(config.ppo)
        logp = (np.zeros(batch["action_mask"].shape, np.float32) if shape.kind == "ppo_value" else
                rollout_logp(trainer.model_config, params, batch, shape.answer))
        batch = fill_ppo_batch(batch, logp, hyper)
    sides = {}
    if not args.skip_torch:
        sides["torch"] = TorchStep(shape.kind, hf_dir, params, batch, dict(opt_cfg), hyper, shape.accum,
                                   autocast_bf16=args.matmul_dtype == "bfloat16")
    sides = {"ours": OurStep(trainer, params, batch), **sides}
    del params
    start = time.perf_counter()
    losses = {"ours": [sides["ours"]()]}
    cell["ours_first_step_s"] = time.perf_counter() - start  # compile included
    if "torch" in sides:
        losses["torch"] = [sides["torch"]()]
    seconds = {name: [] for name in sides}
    for _ in range(args.repeats):  # interleaved: machine load hits both sides alike
        for name, step in sides.items():
            for i in range(args.settle_steps + args.steps):
                start = time.perf_counter()
                loss = step()
                if i >= args.settle_steps:
                    seconds[name].append(time.perf_counter() - start)
                if len(losses[name]) == 1:
                    losses[name].append(loss)
    del sides
    cell["peak_gflops"].append(matmul_peak_gflops(args.peak_size, matmul_dtype=args.matmul_dtype))
    cell["load"].append(os.getloadavg()[0])
    return {**cell, "seconds": seconds, "losses": losses}


# ------------------------------------------------------------------ report

def row(c: dict) -> str:
    def fmt(key, spec):
        return format(c[key], spec) if key in c else "-"
    ratio = f"**{c['ratio']:.2f}x**" if "ratio" in c else "-"
    return (f"| {c['kind']} | {c['shape']} | {c['tokens']} | {fmt('ours_median_s', '.2f')} | "
            f"{fmt('torch_median_s', '.2f')} | {fmt('ours_tokens_per_s', '.0f')} | "
            f"{fmt('torch_tokens_per_s', '.0f')} | {ratio} | {fmt('ours_peak_fraction', '.0%')} | "
            f"{fmt('torch_peak_fraction', '.0%')} | {c['losses']['ours'][0]:.4f} | "
            f"{fmt('first_loss_abs_diff', '.1e')} ({fmt('first_loss_rel_diff', '.0e')}) | "
            f"{fmt('second_loss_abs_diff', '.1e')} |")


def cpu_model() -> str:
    """The processor's name, since the machines these runs land on differ."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def table(cells: list[dict], meta: dict) -> str:
    peaks = [p for c in cells for p in c["peak_gflops"]]
    loads = [x for c in cells for x in c["load"]]
    steps = sorted({len(t) for c in cells for t in c["seconds"].values()})
    lines = [f"# Train steps: ours against transformers + torch ({meta['date']})", "",
             f"{meta['model']}, float32 weights, {meta.get('matmul_dtype', 'float32')} products "
             f"(torch: {'autocast bfloat16' if meta.get('matmul_dtype') == 'bfloat16' else 'float32'}); jax {meta['jax']}, torch {meta.get('torch', '-')} "
             f"({meta['torch_threads']} threads, OMP_WAIT_POLICY={meta.get('omp_wait_policy') or '-'}, "
             f"fused AdamW), transformers {meta.get('transformers', '-')}; "
             f"{meta['cpus']} CPUs ({meta.get('cpu', '?')}), load average {min(loads):.1f}-{max(loads):.1f}, "
             f"GLIBC_TUNABLES={meta.get('glibc_tunables') or '-'}.",
             f"{meta.get('matmul_dtype', 'float32')} matmul peak (jitted product {meta['peak_size']}^2, best of 5, before and after "
             f"each cell; the cell's larger reading is its peak): {min(peaks):.0f}-{max(peaks):.0f} GFLOP/s; "
             f"torch.mm: {meta.get('torch_gflops', float('nan')):.0f} GFLOP/s.",
             f"Median of {'/'.join(map(str, steps))} timed steps a side after one untimed step, ours and "
             f"torch alternating, each side's timed steps in a round after {meta.get('settle_steps', 0)} "
             "untimed one(s) of its own. A token is one position of the padded batch; % peak is 6 x matmul "
             "weights per token x tokens/s over the peak.", "",
             "| step | shape | tokens/step | ours s/step | torch s/step | ours tok/s | torch tok/s | "
             "ours / torch | ours % peak | torch % peak | first loss (ours) | first-step \\|Δloss\\| (rel) "
             "| \\|Δloss\\| after one update |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [row(c) for c in cells]) + "\n"


def merged(path: str, cells: list[dict]) -> list[dict]:
    """The cells saved at `path` (a run split over processes) with these added, a new cell
    replacing a saved one of the same step and shape; in CELLS order."""
    with open(path) as f:
        saved = json.load(f)["cells"]
    fresh = {(c["kind"], c["shape"]) for c in cells}
    out = [c for c in saved if (c["kind"], c["shape"]) not in fresh] + cells
    return sorted(out, key=lambda c: CELLS.index(c["kind"]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.omp_wait_policy and not args.skip_torch:  # read when torch loads OpenMP: set it first
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    torch_was_loaded = "torch" in sys.modules
    import jax
    from cai_jax import sharding as shd
    from cai_jax.config import load_config
    from cai_jax.model_ref import resolve
    from cai_jax.weights.tokenizer import pad_token_id

    config = load_config(args.config)
    config.model.matmul_dtype = args.matmul_dtype
    base = resolve("base", config).load(seed=config.seed, to_device=False)
    pad_id = pad_token_id(base.tokenizer) if base.tokenizer is not None else 0
    mesh = shd.mesh_from_config(config)
    meta = {"date": datetime.date.today().isoformat(), "config": os.path.relpath(args.config, REPO),
            "model": f"{base.source} ({config.model.name})", "jax": jax.__version__, "cpus": os.cpu_count(),
            "torch_threads": args.torch_threads, "peak_size": args.peak_size, "matmul_dtype": args.matmul_dtype,
            "settle_steps": args.settle_steps, "cpu": cpu_model(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    if not args.skip_torch:
        import torch
        import transformers
        from cai_jax.weights.hf import write_hf_dir
        torch.set_num_threads(args.torch_threads)
        transformers.utils.logging.disable_progress_bar()
        meta.update(torch=torch.__version__, transformers=transformers.__version__,
                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "") + (" (set after torch loaded)"
                                                                            if torch_was_loaded else ""),
                    torch_gflops=torch_matmul_gflops(args.peak_size))
    tmp = tempfile.mkdtemp(prefix="bench-train-hf-")
    hf_dir = os.path.join(tmp, "model")
    if not args.skip_torch:
        write_hf_dir(hf_dir, base.config, base.params, base.tokenizer)
    max_len = base.config.max_seq_len
    del base
    cells = []
    try:
        for shape in shapes(args, config, max_len):
            cells.append(summarize(run_cell(shape, args, config, mesh, hf_dir, pad_id)))
            print(row(cells[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stem = os.path.join(args.out_dir, args.name or meta["date"])
    if args.append and os.path.exists(stem + ".json"):
        cells = merged(stem + ".json", cells)
    text = table(cells, meta)
    print("\n" + text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "args": vars(args), "cells": cells}, f, indent=1)
    return {"meta": meta, "cells": cells, "path": stem + ".md"}


if __name__ == "__main__":
    # The steps as the pipeline runs them: with its huge-page allocator setting
    # (cai_jax/huge_pages.py), which torch then shares. CAI_JAX_HUGE_PAGES=0: without.
    from cai_jax.huge_pages import rerun_with_huge_pages
    rerun_with_huge_pages()
    main()
