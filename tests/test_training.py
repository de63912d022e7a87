"""Train step, gradient accumulation, optimizer schedules, the Trainer harness and checkpoint resume."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cai_jax import sharding as shd
from cai_jax.models.config import model_config_from_dict
from cai_jax.models.transformer import Transformer, init_params
from cai_jax.training import lm_loss, optimizers
from cai_jax.training.checkpoint import Checkpointer
from cai_jax.training.metrics import MetricWriter, read_metrics
from cai_jax.training.trainer import Hook, Trainer

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


def _trainer(accum=1, checkpoint_dir=None):
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    return Trainer(CFG, lm_loss.make_lm_loss, OPT, mesh, batch_sharding=shd.data_sharding(mesh, 2),
                   grad_accum_steps=accum, checkpoint_dir=checkpoint_dir)


@functools.lru_cache(maxsize=None)
def _compiled(accum):
    # One trainer per accumulation setting, shared by the tests (compiles dominate).
    return _trainer(accum)


@functools.lru_cache(maxsize=None)
def _init():
    return jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))


def _setup(accum=1):
    trainer = _compiled(accum)
    return trainer.init_state(_init()), trainer.abstract_state, trainer.train_step


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


def test_warmup_is_fitted_to_the_run_in_the_optimizer_builder():
    section = dict(learning_rate=1.0, warmup_steps=5, total_steps=0, schedule="constant")
    assert optimizers.schedule_config(section, 8) == dict(section, warmup_steps=2, total_steps=8)
    assert optimizers.schedule_config(dict(section, total_steps=50), 100)["total_steps"] == 50
    assert optimizers.schedule_config(section, None) == section  # run length unknown (tools.aot)
    # A 2-step run has no warmup: the first step already uses the peak rate.
    tx = optimizers.make_optimizer(dict(section, grad_clip_norm=0.0, b1=0.0, b2=0.0), num_steps=2)
    updates, _ = tx.update({"w": jnp.ones(())}, tx.init({"w": jnp.zeros(())}), {"w": jnp.zeros(())})
    assert abs(float(updates["w"]) + 1.0) < 1e-3


def test_trainer_state_matches_its_abstract_state_and_shardings():
    trainer = _compiled(1)
    state = trainer.init_state(_init())
    for leaf, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.abstract_state)):
        assert (leaf.shape, leaf.dtype) == (abstract.shape, abstract.dtype)
        assert leaf.sharding.is_equivalent_to(abstract.sharding, leaf.ndim)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    data = _batches(5, seed=1)
    inits, hook_steps = [], []

    def run(directory, stop_after=None):
        trainer = _trainer(checkpoint_dir=str(directory / "ckpt"))
        writer = MetricWriter(str(directory), tensorboard=False)
        start = trainer.start(lambda: inits.append(directory) or _init(), jax.random.key(7), writer)
        hook = Hook(lambda state, step: hook_steps.append(step) or {"hooked": int(state.step)}, every=3)
        state, _ = trainer.train(start, ListIterator(data), num_steps=8, writer=writer, hooks=[hook],
                                 save_every=2, progress=False, stop_after=stop_after)
        trainer.close()
        return jax.tree.map(np.asarray, state.params)

    unbroken = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=5)  # "killed" after step 5; last checkpoint is step 4
    resumed = run(tmp_path / "b")
    assert inits == [tmp_path / "a", tmp_path / "b"]  # the resumed run restored, never initialised
    for a, b in zip(jax.tree.leaves(unbroken), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    rows = read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["step"] for r in rows if "hooked" in r] == [3, 6, 8]  # every 3 steps and the last
    assert all(r["hooked"] == r["step"] for r in rows if "hooked" in r)
    assert hook_steps == [3, 6, 8] + [3] + [6, 8]
    assert Checkpointer(str(tmp_path / "b" / "ckpt")).all_steps() == [6, 8]  # keep-last-2
