"""Train step, gradient accumulation, optimizer schedules, checkpoint resume."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cai_jax import sharding as shd
from cai_jax.models.config import model_config_from_dict
from cai_jax.models.transformer import Transformer, init_params
from cai_jax.training import lm_loss, optimizers, train_step as ts
from cai_jax.training.checkpoint import Checkpointer
from cai_jax.training.loop import train_loop
from cai_jax.training.metrics import MetricWriter, read_metrics

CFG = model_config_from_dict({"name": "tiny", "vocab_size": 256})
OPT = dict(learning_rate=3e-3, warmup_steps=2, total_steps=8, schedule="cosine",
           grad_clip_norm=1.0, weight_decay=0.01)


class ListIterator:
    """A minimal checkpointable iterator: the state is the position."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __next__(self):
        batch = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return batch

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]


def _batches(n, batch=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(4, length + 1, batch)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        out.append({"tokens": rng.integers(0, 256, (batch, length)).astype(np.int32) * mask,
                    "attention_mask": mask, "loss_mask": mask})
    return out


@functools.lru_cache(maxsize=None)
def _compiled(accum):
    # One compiled step per accumulation setting, shared by the tests (compiles dominate).
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    opt = optimizers.make_optimizer(OPT)
    psh = shd.param_shardings(CFG, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _init())
    ssh = ts.state_shardings(psh, opt, abstract, mesh)
    step = ts.build_train_step(lm_loss.make_lm_loss(Transformer(CFG)), opt, mesh, ssh,
                               shd.data_sharding(mesh, 2), grad_accum_steps=accum)
    return opt, psh, ssh, step


@functools.lru_cache(maxsize=None)
def _init():
    return jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))


def _setup(accum=1):
    opt, psh, ssh, step = _compiled(accum)
    return ts.init_train_state(shd.place(_init(), psh), opt), ssh, step


def test_grad_accumulation_gives_the_global_mean():
    # Rows with different numbers of target tokens: averaging per-micro-batch means
    # would weight them wrongly; sum/denominator must not.
    batch = _batches(1, batch=4)[0]
    s1, _, step1 = _setup(accum=1)
    s2, _, step2 = _setup(accum=4)
    s1, m1 = step1(s1, batch, jax.random.key(0))
    s2, m2 = step2(s2, batch, jax.random.key(0))
    assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-5
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_loss_is_masked_mean_over_targets():
    batch = _batches(1)[0]
    state, _, step = _setup()
    params = jax.tree.map(np.asarray, state.params)
    _, m = step(state, batch, jax.random.key(0))
    # Independent: per-position log-softmax with NumPy from the model's logits.
    out, _ = Transformer(CFG).apply({"params": params}, jnp.asarray(batch["tokens"]),
                                    jnp.maximum(np.cumsum(batch["attention_mask"], 1) - 1, 0),
                                    jnp.asarray(batch["attention_mask"]))
    logits = np.asarray(out["logits"], np.float64)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if batch["loss_mask"][b, t + 1]:
                row = logits[b, t]
                logz = np.log(np.exp(row - row.max()).sum()) + row.max()
                total += logz - row[batch["tokens"][b, t + 1]]
                count += 1
    assert abs(float(m["loss"]) - total / count) < 1e-4


def test_training_reduces_loss():
    batch = _batches(1)[0]
    state, _, step = _setup()
    losses = []
    for i in range(8):
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 1.0


def test_schedules():
    sched = optimizers.make_schedule(dict(learning_rate=1.0, warmup_steps=4, total_steps=14,
                                          schedule="linear", final_lr_fraction=0.0))
    np.testing.assert_allclose([float(sched(s)) for s in (0, 2, 4, 9, 14)], [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="optimizer.schedule"):
        optimizers.make_schedule(dict(learning_rate=1.0, warmup_steps=0, total_steps=1, schedule="bogus"))


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    data = _batches(5, seed=1)

    def run(directory, stop_after=None):
        state, ssh, step = _setup()
        writer = MetricWriter(str(directory), tensorboard=False)
        state, _ = train_loop(train_step=step, state=state, state_sharding=ssh,
                              data_iter=ListIterator(data), rng=jax.random.key(7), num_steps=8,
                              checkpointer=Checkpointer(str(directory / "ckpt"), keep_last=2),
                              save_every=2, writer=writer, progress=False, stop_after=stop_after)
        return jax.tree.map(np.asarray, state.params)

    unbroken = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=5)  # "killed" after step 5; last checkpoint is step 4
    resumed = run(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(unbroken), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    steps = [r["step"] for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl"))]
    assert steps == list(range(1, 9))
    assert Checkpointer(str(tmp_path / "b" / "ckpt")).all_steps() == [6, 8]  # keep-last-2
