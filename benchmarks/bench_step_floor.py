"""How fast a train step could be here: its matrix products alone, and AdamW alone (issue #20).

    python benchmarks/bench_step_floor.py                 # SFT 8 x 384 (2 micro-batches), PM 4 pairs x 320
    python benchmarks/bench_step_floor.py --repeats 3     # fewer timings per product (quicker, noisier)

Every product an SFT or preference-model step of SmolLM2-135M computes in
float32 (the default run's shapes, bench_train.py's cells), each timed alone
as a jitted einsum in XLA and as torch.einsum on --torch_threads threads, best
of --repeats, then added up with the number of times the step runs it: the
trunk's four kernels per layer forward and their two gradients, attention's
score and value products and their four gradients, and for SFT the tied LM
head (forward, the forward again that lm_loss's chunked backward recomputes,
and its two gradients). The products are given the whole micro-batch at once,
the most favourable shape; a step runs them between other work (norms,
softmax, rope, residual adds, activations kept for the backward), which
these sums leave out. AdamW with global-norm clipping over the 135M
parameters is timed alone as well: optax's update jitted with the state
donated, and torch's fused AdamW after clip_grad_norm_.

So "XLA products + AdamW" is a floor under our step and the torch column one
under torch's: a step cannot take less. bench_train.py times the whole steps
beside each other; issue #20 asks ours to be 1.3x torch's.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import numpy as np

from bench_train import best_of

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@dataclasses.dataclass(frozen=True)
class Product:
    """einsum `spec` of operands shaped `a` and `b`, run `count` times a step."""
    what: str
    spec: str
    a: tuple
    b: tuple
    count: int

    @property
    def flops(self) -> float:
        sizes = {}
        ins, out = self.spec.split("->")
        for letters, shape in zip(ins.split(","), (self.a, self.b)):
            sizes.update(zip(letters, shape))
        return 2.0 * np.prod([sizes[c] for c in set(ins.replace(",", ""))])


def step_products(cfg, rows: int, width: int, micro_batches: int, lm_head: bool) -> list[Product]:
    """The float32 products of one step over `micro_batches` micro-batches of
    `rows` x `width` tokens, in the Flax model's activations-first layout."""
    n, d, L = rows * width, cfg.d_model, cfg.num_layers
    kv, g, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    m = micro_batches
    out = []
    for name, k_in, k_out in (("qkv", d, kv * (g + 2) * hd), ("o", cfg.num_heads * hd, d),
                              ("gate_up", d, 2 * cfg.mlp_dim), ("down", cfg.mlp_dim, d)):
        out += [Product(f"{name} forward", "ni,io->no", (n, k_in), (k_in, k_out), L * m),
                Product(f"{name} input gradient", "no,io->ni", (n, k_out), (k_in, k_out), L * m),
                Product(f"{name} weight gradient", "ni,no->io", (n, k_in), (n, k_out), L * m)]
    q, k, s, p = (rows, kv, width * g, hd), (rows, kv, hd, width), (rows, kv, width * g, width), (rows, kv, width, hd)
    out += [Product("attention scores", "bkrd,bkds->bkrs", q, k, L * m),
            Product("attention values", "bkrs,bksd->bkrd", s, p, L * m),
            Product("scores: query gradient", "bkrs,bkds->bkrd", s, k, L * m),
            Product("scores: key gradient", "bkrd,bkrs->bkds", q, s, L * m),
            Product("values: probs gradient", "bkrd,bksd->bkrs", q, p, L * m),
            Product("values: value gradient", "bkrs,bkrd->bksd", s, q, L * m)]
    if lm_head:
        v = cfg.vocab_size
        out += [Product("LM head forward (and its recompute)", "nd,vd->nv", (n, d), (v, d), 2 * m),
                Product("LM head input gradient", "nv,vd->nd", (n, v), (v, d), m),
                Product("LM head weight gradient", "nd,nv->dv", (n, d), (n, v), m)]
    return out


def time_xla(p: Product, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal(p.a, np.float32))
    b = jnp.asarray(rng.standard_normal(p.b, np.float32))
    f = jax.jit(lambda x, y: jnp.einsum(p.spec, x, y))
    return best_of(lambda: f(a, b).block_until_ready(), repeats)


def time_torch(p: Product, repeats: int) -> float:
    import torch

    a, b = torch.randn(*p.a), torch.randn(*p.b)
    return best_of(lambda: torch.einsum(p.spec, a, b), repeats)


def time_adamw_xla(cfg, opt: dict, repeats: int) -> float:
    import jax
    import optax

    from cai_jax.models.transformer import init_params
    from cai_jax.training.optimizers import make_optimizer

    params = init_params(cfg, jax.random.key(0))
    grads = jax.tree.map(lambda x: x * 1e-3, params)
    tx = make_optimizer(dict(opt, schedule="constant", warmup_steps=0, total_steps=0))  # the trainers' AdamW
    state = [params, tx.init(params)]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def one():
        state[0], state[1] = update(state[0], state[1], grads)
        jax.block_until_ready(state[0])
    return best_of(one, repeats)


def time_adamw_torch(cfg, opt: dict, repeats: int) -> float:
    import torch

    sizes = [int(np.prod(x.shape)) for x in _param_shapes(cfg)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adam = torch.optim.AdamW(params, lr=opt["learning_rate"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"],
                             weight_decay=opt["weight_decay"], fused=True)

    def one():
        torch.nn.utils.clip_grad_norm_(params, opt["grad_clip_norm"])
        adam.step()
    return best_of(one, repeats)


def _param_shapes(cfg):
    import jax

    from cai_jax.models.transformer import abstract_params

    return jax.tree.leaves(jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                                        abstract_params(cfg)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--out", help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_train.py
    sys.path.insert(0, REPO)
    import torch

    from cai_jax.config import load_config
    from cai_jax.models.config import TransformerConfig, MODEL_LADDER

    torch.set_num_threads(args.torch_threads)
    config = load_config(args.config)
    cfg = TransformerConfig(**MODEL_LADDER["smollm2-135m"])
    sl, pm = config.sl_train, config.pm_train
    cells = {
        "sft": step_products(cfg, sl.batch_size // sl.grad_accum_steps, sl.max_seq_len, sl.grad_accum_steps, True),
        "pm": step_products(cfg, 2 * pm.batch_size // pm.grad_accum_steps, pm.max_seq_len, pm.grad_accum_steps,
                            False),
    }
    opt = {k: float(v) for k, v in sl.optimizer.to_dict().items()
           if k in ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")}
    cache: dict = {}
    report = {}
    for cell, products in cells.items():
        rows = []
        for prod in products:
            key = (prod.spec, prod.a, prod.b)
            if key not in cache:
                cache[key] = (time_xla(prod, args.repeats), time_torch(prod, args.repeats))
            xla, tch = cache[key]
            rows.append({"what": prod.what, "spec": prod.spec, "a": prod.a, "b": prod.b, "count": prod.count,
                         "gflop": prod.flops * prod.count / 1e9, "xla_s": xla * prod.count,
                         "torch_s": tch * prod.count})
            print(f"{cell:4s} {prod.what:38s} x{prod.count:3d}  XLA {xla * 1e3:8.2f} ms  "
                  f"torch {tch * 1e3:8.2f} ms  ({prod.flops / xla / 1e9:5.0f} / {prod.flops / tch / 1e9:5.0f} "
                  f"GFLOP/s)", file=sys.stderr, flush=True)
        report[cell] = rows
    adam = {"xla_s": time_adamw_xla(cfg, opt, args.repeats), "torch_s": time_adamw_torch(cfg, opt, args.repeats)}
    print(f"\n# Train-step floors, SmolLM2-135M float32 ({time.strftime('%Y-%m-%d')}, best of {args.repeats})\n")
    print("| step | product GFLOP | XLA products s | torch products s | AdamW s (XLA / torch) "
          "| floor s (XLA / torch) |")
    print("|---|---:|---:|---:|---:|---:|")
    for cell, rows in report.items():
        gflop = sum(r["gflop"] for r in rows)
        xla, tch = sum(r["xla_s"] for r in rows), sum(r["torch_s"] for r in rows)
        print(f"| {cell} | {gflop:,.0f} | {xla:.2f} ({gflop / xla:.0f} GFLOP/s) | {tch:.2f} ({gflop / tch:.0f} "
              f"GFLOP/s) | {adam['xla_s']:.2f} / {adam['torch_s']:.2f} | {xla + adam['xla_s']:.2f} / "
              f"{tch + adam['torch_s']:.2f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"cells": report, "adamw": adam}, f, indent=1)
    return {"cells": report, "adamw": adam}


if __name__ == "__main__":
    main()
