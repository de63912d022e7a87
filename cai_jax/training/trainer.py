"""The one training harness: SFT, the preference model and PPO's policy and value.

    trainer = Trainer(model_config, make_loss, section.optimizer, mesh,
                      batch_sharding=..., num_steps=N, grad_accum_steps=k,
                      checkpoint_dir=".../checkpoints")
    start = trainer.start(lambda: params, jax.random.key(seed), writer)
    state, last = trainer.train(start, data_iter, num_steps=N, writer=writer,
                                hooks=[eval_hook(evaluate, every=20)], save_every=50)

Given a model config, a loss (built from the model), an optimizer section, a
mesh and a checkpoint directory, a Trainer builds, as Levanter's
`trainer.initial_state` does:

  1. the optimizer (optimizers.make_optimizer: total_steps and the warmup
     fitted to the run's length, in that one place);
  2. the abstract train state (`jax.eval_shape` of the init: nothing is
     allocated) and its shardings: parameters by their logical axis names,
     optimizer moments following their parameters;
  3. the train step (train_step.build_train_step): jit with in/out shardings,
     the state donated, gradient accumulation summing (loss, count) pairs.

`start` restores the latest checkpoint onto the abstract state if there is
one (state, PRNG key, data-iterator state) and only otherwise calls `init`,
in that order, so a run killed after any checkpoint continues with the same
batches and keys and ends where an unbroken run ends (and a resumed run never
loads its initial weights onto the chips). `train` runs the steps, logs each
step's metrics, runs hooks every N steps (held-out evaluation, ...) and saves
checkpoints every `save_every` steps and at the end.

PPO runs its own iteration loop (rl_cai/ppo.py) over two trainers' steps,
with `restore_or_init` for its combined checkpoint. `cai_jax.tools.aot_steps`
compiles `trainer.train_step` on `trainer.abstract_state`: the program the
stage runs, for a TPU topology.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import optax
from tqdm.auto import tqdm

from cai_jax import processes, sharding as shd
from cai_jax.errors import DivergenceError
from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import Transformer, abstract_params
from cai_jax.training import optimizers, train_step as ts
from cai_jax.training.checkpoint import Checkpointer, abstract_with_shardings


@dataclasses.dataclass
class Hook:
    """`fn(state, step)` runs after every `every`-th step and after the last one;
    what it returns (a dict or None) is logged with that step's metrics."""

    fn: Callable[[Any, int], Optional[Mapping]]
    every: int


def eval_hook(evaluate: Callable[[Any], Mapping], every: int) -> Hook:
    """Held-out evaluation of the parameters, logged as eval_<name>."""
    return Hook(lambda state, step: {f"eval_{k}": float(v) for k, v in evaluate(state.params).items()},
                every)


# What the divergence guard reads of each step's metrics (train_step's names).
GUARDED = ("loss", "grad_norm", "update_norm")


def first_nonfinite(metrics: Mapping[str, float]) -> Optional[tuple[str, float]]:
    for key in GUARDED:
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            return key, value
    return None


class NonfiniteBudget:
    """The divergence guard: a non-finite guarded quantity in a step's metrics
    (the host floats already fetched for logging, so no extra device sync)
    raises DivergenceError naming `where` and the quantity. Up to `allowed`
    non-finite steps are skipped instead (their step must be built with
    skip_nonfinite, which leaves the state as it was), with a warning each;
    the next one stops the stage.
    `used` is checkpointed with the run, so a resumed run keeps counting."""

    def __init__(self, allowed: int, used: int = 0):
        self.allowed, self.used = allowed, used

    def check(self, metrics: Mapping[str, float], where: str) -> bool:
        """False for a finite step, True for one to skip; raises past the budget."""
        bad = first_nonfinite(metrics)
        if bad is None:
            return False
        key, value = bad
        if self.used >= self.allowed:
            skips = f" after {self.used} skipped (the most allowed)" if self.allowed else ""
            raise DivergenceError(
                f"{where}: {key} is {value}{skips}; stopped before saving anything from this step "
                "(the last good checkpoint is kept); check the learning rate and the data")
        self.used += 1
        print(f"warning: {where}: {key} is {value}; step skipped, parameters unchanged "
              f"({self.used} of {self.allowed} skips used)", file=sys.stderr, flush=True)
        return True


@dataclasses.dataclass
class Start:
    """Where a run starts: restored from its latest checkpoint or freshly initialised."""

    state: Any
    rng: jax.Array
    step: int  # steps (iterations) already done: the checkpoint's step, 0 when fresh
    extra: dict  # what the checkpoint saved beside the state ({} when fresh)
    resumed: bool


def restore_or_init(checkpointer: Optional[Checkpointer], abstract_state, init: Callable[[], Any],
                    rng: jax.Array, writer=None) -> Start:
    """The order every run starts in: the latest checkpoint of `checkpointer`
    restored onto `abstract_state` (ShapeDtypeStructs with shardings) if there
    is one, else `init()`. The metrics log keeps the steps the state has done
    (a fresh start drops lines a run killed before its first checkpoint left)."""
    step = checkpointer.latest_step() if checkpointer is not None else None
    if step is not None:
        state, rng, extra = checkpointer.restore(abstract_state, step)
        if writer is not None:
            writer.truncate_from(step + 1)
        return Start(state, rng, step, extra, True)
    if writer is not None:
        writer.truncate_from(0)
    return Start(init(), rng, 0, {}, False)


class Trainer:
    """One model's training on a mesh (see the module docstring).

    `loss(model)` returns the loss_fn(params, batch, rng) -> (sum, count,
    metric sums) of train_step. `optimizer` is an optimizer section (built
    with make_optimizer for `num_steps`) or, in tests, an optax transformation.
    `batch_sharding` is a sharding or a pytree of them matching the batch.
    """

    def __init__(self, model_config: TransformerConfig, loss: Callable[[Transformer], ts.LossFn],
                 optimizer, mesh, *, batch_sharding, num_steps: Optional[int] = None,
                 grad_accum_steps: int = 1, checkpoint_dir: Optional[str] = None,
                 keep_checkpoints: int = 2, rules=shd.DEFAULT_RULES, max_nonfinite_skips: int = 0):
        self.model_config, self.mesh, self.batch_sharding = model_config, mesh, batch_sharding
        self.model = Transformer(model_config)
        self.optimizer = (optimizer if isinstance(optimizer, optax.GradientTransformation)
                          else optimizers.make_optimizer(optimizer, num_steps))
        boxed = abstract_params(model_config)
        params = nn.meta.unbox(boxed)
        self.param_shardings = shd.logical_shardings(boxed, mesh, rules)
        self.state_sharding = ts.state_shardings(self.param_shardings, self.optimizer, params, mesh)
        self.abstract_state = abstract_with_shardings(ts.abstract_train_state(params, self.optimizer),
                                                      self.state_sharding)
        self.max_nonfinite_skips = max_nonfinite_skips
        self.train_step = ts.build_train_step(loss(self.model), self.optimizer, mesh, self.state_sharding,
                                              batch_sharding, grad_accum_steps, rules,
                                              skip_nonfinite=max_nonfinite_skips > 0)
        # The placed copy of the parameters is ours: donate it to the state.
        self._init = jax.jit(lambda p: ts.init_train_state(p, self.optimizer),
                             out_shardings=self.state_sharding, donate_argnums=(0,))
        self.checkpointer = (Checkpointer(checkpoint_dir, keep_last=keep_checkpoints)
                             if checkpoint_dir else None)

    def init_state(self, params) -> ts.TrainState:
        """A fresh train state from host or device parameters (the caller keeps its copy)."""
        return self._init(shd.place(params, self.param_shardings))

    def start(self, init_params: Callable[[], Any], rng: jax.Array, writer=None) -> Start:
        """Restores the latest checkpoint, or else starts from `init_params()`."""
        return restore_or_init(self.checkpointer, self.abstract_state,
                               lambda: self.init_state(init_params()), rng, writer)

    def train(self, start: Start, data_iter, *, num_steps: int, writer=None,
              hooks: Sequence[Hook] = (), save_every: int = 0, desc: str = "train",
              progress: bool = True, stop_after: Optional[int] = None):
        """Runs steps start.step..num_steps. `data_iter` has get_state() and
        set_state() (its state is checkpointed). `stop_after` (tests) ends early,
        as a kill would, after that step. A non-finite loss, gradient or update
        raises DivergenceError before that step's hooks, log line or checkpoint,
        unless max_nonfinite_skips allows skipping it (NonfiniteBudget).
        Returns (state, last step's logged metrics)."""
        state, rng = start.state, start.rng
        budget = NonfiniteBudget(self.max_nonfinite_skips, start.extra.get("nonfinite_skips", 0))
        if "data" in start.extra:
            data_iter.set_state(start.extra["data"])
        logged = {}
        bar = tqdm(total=num_steps, initial=start.step, desc=desc, disable=not progress,
                   dynamic_ncols=True)
        for step in range(start.step, num_steps):
            rng, step_rng = jax.random.split(rng)
            batch = processes.put_batch(next(data_iter), self.batch_sharding)
            state, metrics = self.train_step(state, batch, step_rng)
            done = step + 1
            logged = {k: float(v) for k, v in metrics.items()}
            if budget.check(logged, f"{desc} step {done}"):
                logged = {"skipped_nonfinite": float(budget.used)}  # no NaN in the log
            for hook in hooks:
                if hook.every and (done % hook.every == 0 or done == num_steps):
                    logged.update(hook.fn(state, done) or {})
            if writer is not None:
                writer.write(done, logged)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k in ("loss", "eval_loss")})
            bar.update(1)
            if self.checkpointer is not None and ((save_every and done % save_every == 0)
                                                 or done == num_steps):
                self.checkpointer.save(done, state, rng, {"data": data_iter.get_state(),
                                                          "nonfinite_skips": budget.used})
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        return state, logged

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
