"""Faults (issue #19): a diverging step never reaches a checkpoint or a saved
model, a failed rerun leaves the finished work as it was, and a run killed at
any point resumes to the artifacts of an unbroken run."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cai_jax import artifacts, pipeline
from cai_jax import sharding as shd
from cai_jax.errors import DivergenceError
from cai_jax.model_ref import rl_checkpoints
from cai_jax.models.config import model_config_from_dict
from cai_jax.models.transformer import init_params
from cai_jax.training import lm_loss
from cai_jax.training.checkpoint import Checkpointer
from cai_jax.training.trainer import Trainer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


# ------------------------------------------------------------ the divergence guard, in the trainer

class _Batches:
    def __init__(self, batch):
        self.batch, self.pos = batch, 0

    def __next__(self):
        self.pos += 1
        return self.batch

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]


def test_a_step_that_makes_nan_stops_training_before_its_checkpoint(tmp_path):
    cfg = model_config_from_dict({"name": "tiny", "vocab_size": 256})
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    # Finite for two steps, then a NaN learning rate: the loss and gradient of
    # step 3 are still finite, only its update is not.
    optimizer = optax.sgd(lambda count: jnp.where(count < 2, 1e-3, jnp.nan))
    trainer = Trainer(cfg, lm_loss.make_lm_loss, optimizer, mesh, batch_sharding=shd.data_sharding(mesh, 2),
                      checkpoint_dir=str(tmp_path / "ckpt"), keep_checkpoints=5)
    mask = np.ones((2, 8), np.int32)
    batch = {"tokens": np.arange(16, dtype=np.int32).reshape(2, 8), "attention_mask": mask, "loss_mask": mask}
    start = trainer.start(lambda: init_params(cfg, jax.random.key(0)), jax.random.key(0))
    with pytest.raises(DivergenceError) as error:
        trainer.train(start, _Batches(batch), num_steps=5, save_every=1, desc="sl_train", progress=False)
    assert str(error.value).startswith("sl_train step 3: update_norm is nan; stopped before saving")
    trainer.close()
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    assert checkpointer.all_steps() == [1, 2]  # the last good one is the latest
    state, _, _ = checkpointer.restore(trainer.abstract_state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


class _BatchList(_Batches):
    def __init__(self, batches):
        super().__init__(None)
        self.batches = batches

    def __next__(self):
        self.pos += 1
        return self.batches[self.pos - 1]


def _scaled_lm_loss(model):
    # The LM loss times the batch's "scale": a NaN scale makes a non-finite step
    # from the data alone (the optimizer state stays clean).
    lm = lm_loss.make_lm_loss(model)

    def loss_fn(params, batch, rng):
        total, count, metrics = lm(params, {k: v for k, v in batch.items() if k != "scale"}, rng)
        return total * batch["scale"][0, 0], count, metrics
    return loss_fn


def _scaled_batches(scales):
    mask = np.ones((2, 8), np.int32)
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    return [{"tokens": (tokens + i) % 256, "attention_mask": mask, "loss_mask": mask,
             "scale": np.full((2, 1), s, np.float32)} for i, s in enumerate(scales)]


def _train_scaled(tmp_path, name, batches, max_skips):
    cfg = model_config_from_dict({"name": "tiny", "vocab_size": 256})
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    trainer = Trainer(cfg, _scaled_lm_loss, optax.sgd(1e-2), mesh, batch_sharding=shd.data_sharding(mesh, 2),
                      checkpoint_dir=str(tmp_path / name), max_nonfinite_skips=max_skips)
    start = trainer.start(lambda: init_params(cfg, jax.random.key(0)), jax.random.key(0))
    try:
        state, _ = trainer.train(start, _BatchList(batches), num_steps=len(batches), progress=False, desc="pm_train")
    finally:
        trainer.close()
    return jax.tree.map(np.asarray, state.params)


def test_a_bounded_number_of_nonfinite_steps_can_be_skipped(tmp_path, capsys):
    batches = _scaled_batches([1.0, 1.0, float("nan"), 1.0, 1.0])
    skipped = _train_scaled(tmp_path, "skip", batches, max_skips=1)
    assert "pm_train step 3: loss is nan; step skipped, parameters unchanged (1 of 1" in capsys.readouterr().err
    # The skipped step changed nothing: the same as training on the other four batches.
    reference = _train_scaled(tmp_path, "ref", batches[:2] + batches[3:], max_skips=0)
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    # One more non-finite step than allowed stops the stage.
    with pytest.raises(DivergenceError, match="pm_train step 4: loss is nan after 1 skipped"):
        _train_scaled(tmp_path, "over", _scaled_batches([1.0, 1.0, float("nan"), float("nan"), 1.0]), max_skips=1)


def test_flipped_bytes_in_a_training_checkpoint_stop_the_resume_naming_it(tmp_path):
    from cai_jax.errors import UserError

    state = {"w": jnp.arange(4096, dtype=jnp.float32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, state, jax.random.key(0), {"data": {"pos": 1}})
    restored, _, extra = checkpointer.restore(abstract)  # intact: restores
    assert extra == {"data": {"pos": 1}}
    biggest = max((p for p in (tmp_path / "ckpt" / "1").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"checkpoint {tmp_path / 'ckpt' / '1'} does not match the checksum"):
        checkpointer.restore(abstract)
    checkpointer.close()


# ------------------------------------------------------------ a saved model's fingerprint

def _flip_bytes(path, count=64):
    """Flips `count` bytes in the middle of a file, in place."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(count)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_model_saved_twice_keeps_its_fingerprint_and_flipped_bytes_change_it(tmp_path):
    from cai_jax.weights.loader import load_model
    from cai_jax.weights.model_dir import save_model_dir

    tiny = load_model("init:tiny", to_device=False)
    for name in ("a", "b"):  # a retrained model with the same weights: orbax names its files anew
        save_model_dir(str(tmp_path / name), tiny.config, tiny.params, tiny.tokenizer, about={"stage": "x"})
        save_model_dir(str(tmp_path / name / "value"), tiny.config, tiny.params, about={"stage": "x"})
    a, b = tmp_path / "a", tmp_path / "b"
    assert sorted(p.name for p in (a / "params" / "d").iterdir()) != sorted(p.name for p in (b / "params" / "d").iterdir())
    assert artifacts.content_fingerprint(str(a)) == artifacts.content_fingerprint(str(b))
    assert artifacts.content_fingerprint(str(a / "value")) == artifacts.path_fingerprint(str(a / "value"))
    intact = artifacts.content_fingerprint(str(a))

    # Other weights, or the same weights with another about.json: another fingerprint.
    changed = dict(tiny.params, final_norm={"scale": tiny.params["final_norm"]["scale"] * 2})
    save_model_dir(str(tmp_path / "c"), tiny.config, changed, tiny.tokenizer, about={"stage": "x"})
    save_model_dir(str(tmp_path / "d"), tiny.config, tiny.params, tiny.tokenizer, about={"stage": "y"})
    fingerprints = {artifacts.path_fingerprint(str(tmp_path / n)) for n in "abcd"}
    assert len(fingerprints) == 3

    # Flipped bytes in the weights (the model's own or its value head's, a
    # sealed directory inside it), a file added or taken away: the files no
    # longer match the seal, and the fingerprint the pipeline checks changes.
    for damage in ("weights", "value", "added", "removed", "seal"):
        shutil.rmtree(b)
        shutil.copytree(a, b)
        if damage == "weights":
            _flip_bytes(_largest_file(b / "params"))
        elif damage == "value":
            _flip_bytes(_largest_file(b / "value" / "params"))
        elif damage == "added":
            (b / "params" / "d" / "stray").write_bytes(b"x")
        elif damage == "removed":
            os.remove(b / "tokenizer" / "tokenizer_config.json")
        else:
            seal = json.loads((b / "saved.json").read_text())
            seal["files"]["model.json"] = "0" * 16
            (b / "saved.json").write_text(json.dumps(seal))
        assert artifacts.content_fingerprint(str(b)) != intact, damage


# ------------------------------------------------------------ whole runs of the tiny config

def _main(workdir, *extra):
    return [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--noprogress", *extra]


def _run(workdir, *extra, timeout=1800):
    out = subprocess.run(_main(workdir, *extra), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return out.returncode, out.stdout, out.stderr.strip().splitlines()


def _snapshot(workdir) -> dict:
    """Every finished file of a run (staging and the lock aside) and its checksum."""
    return {os.path.relpath(os.path.join(root, name), workdir): artifacts.file_hash(os.path.join(root, name))
            for root, dirs, names in os.walk(workdir) if ".staging" not in root.split(os.sep)
            for name in names if name != ".lock"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    code, _, stderr = _run(workdir)
    assert code == 0, stderr[-30:]
    return workdir


# SL-CAI on the tiny model with a checkpoint per step, for a kill between them.
_SL = ("--stages=sl_generate,sl_train", "--config.sl_train.num_steps=4", "--config.sl_train.save_every=1")


def _manifests(workdir) -> dict:
    """The run's stage manifests without their timing."""
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
            for p in sorted((workdir / "stages").glob("*.json"))}


@pytest.mark.slow  # about 85 s on two cores; the fingerprint-twice test above covers the mechanism
def test_a_resumed_run_and_a_retrained_model_keep_the_unbroken_runs_manifests(tmp_path):
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    code, _, stderr = _run(unbroken, *_SL)
    assert code == 0, stderr[-20:]
    expected = _manifests(unbroken)
    assert set(expected) == {"sl_generate.json", "sl_train.json"}

    # The same run killed in sl_train once its first checkpoint is saved, then resumed.
    shutil.copytree(unbroken, resumed)
    for rel in ("models", "sl_train", "stages/sl_train.json", "config.json"):
        path = resumed / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    proc = subprocess.Popen(_main(resumed, *_SL), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    saved = resumed / ".staging" / "sl_train" / "sl_train" / f"checkpoints{artifacts.CHECKSUMS_SUFFIX}"
    try:
        while proc.poll() is None and not saved.exists():
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (resumed / "stages" / "sl_train.json").exists(), "sl_train finished before the kill"
    code, stdout, stderr = _run(resumed, *_SL)
    assert code == 0, stderr[-20:]
    assert "| sl_generate | skipped (complete)" in stdout and "| sl_train | done" in stdout
    # Orbax named the model's files anew; the weights, and so the fingerprints, are the same.
    assert _manifests(resumed) == expected

    # Flipped bytes in the saved model rerun its stage, which saves the same
    # weights again: the manifest is as it was, so nothing downstream would rerun.
    _flip_bytes(_largest_file(unbroken / "models" / "sl_cai" / "params"))
    code, stdout, stderr = _run(unbroken, "--stages=sl_train", *_SL[1:])
    assert code == 0, stderr[-20:]
    assert "sl_train: models/sl_cai changed since it was made; rerunning" in stdout
    assert _manifests(unbroken) == expected


# ------------------------------------------------------------ kills at random points (short)

def _two_stage(workdir, kill_after=None, signum=signal.SIGKILL, *options):
    """Runs tests/scripts/two_stage_run.py; with `kill_after` seconds, sends it
    `signum` then (if it is still running). Returns whether it completed, its
    exit status and its stderr lines."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "scripts", "two_stage_run.py"),
                             str(workdir), *options], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = ""
    if kill_after is not None:
        # Timed from the handlers' installation, not the start: on a busy
        # machine the imports alone can outlast a short delay.
        first = proc.stdout.readline()
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    out = first + out
    if kill_after is None and not options:
        assert proc.returncode == 0, err[-2000:]
    return "complete" in out, proc.returncode, err.strip().splitlines()


def _finished_files(workdir) -> dict:
    """Every file of the run except the lock and the staging area, by content."""
    out = {}
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if d != pipeline.STAGING]
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, workdir)
            if rel != pipeline.LOCK:
                out[rel] = artifacts.file_hash(path)
    return out


def test_a_run_killed_at_random_points_resumes_to_the_unbroken_result(tmp_path):
    # The short version of the slow test below: a two-stage pipeline (scratch,
    # a model directory, an input read downstream) killed with SIGKILL at
    # seeded random times, inside stages, in swaps and between, then run to the end.
    unbroken = tmp_path / "unbroken"
    _two_stage(unbroken)
    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(6):
        if _two_stage(killed, kill_after=rng.uniform(0.4, 2.2))[0]:
            break  # finished before the kill
        kills += 1
    _two_stage(killed)
    assert kills >= 3
    _assert_same_run(killed, unbroken)


def _assert_same_run(killed, unbroken) -> None:
    expected = _finished_files(unbroken)
    got = _finished_files(killed)
    manifests = {k for k in expected if k.startswith("stages" + os.sep)}
    # Manifests record seconds and summaries (how far a resumed stage had got): compare the rest.
    assert {k: v for k, v in got.items() if k not in manifests} == \
        {k: v for k, v in expected.items() if k not in manifests}
    assert set(got) == set(expected)
    for name in manifests:
        ours, theirs = (json.load(open(os.path.join(d, name))) for d in (killed, unbroken))
        assert ours["outputs"] == theirs["outputs"] and ours["fingerprint"] == theirs["fingerprint"]


INTERRUPTED = r"^interrupted (before the first stage|(during|after) stage \w+); rerun the same command to resume$"


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_interrupted_at_random_points_stops_with_one_line_and_resumes(tmp_path, signum, status):
    # Before: Ctrl-C was a KeyboardInterrupt traceback (or dropped in a gc
    # callback, and the run exited 0); SIGTERM exited -15 without a word and
    # left the lock. Now: one line, 128 + the signal, the lock released, and
    # the runs that follow resume to the unbroken result.
    unbroken, interrupted = tmp_path / "unbroken", tmp_path / "interrupted"
    _two_stage(unbroken)
    rng, stops = random.Random(signum), 0
    for _ in range(6):
        complete, code, stderr = _two_stage(interrupted, rng.uniform(0.2, 1.4), signum)
        if complete:
            break  # finished before the signal
        assert code == status and len(stderr) == 1 and re.match(INTERRUPTED, stderr[0]), (code, stderr)
        assert not (interrupted / pipeline.LOCK).exists()
        stops += 1
    _two_stage(interrupted)
    assert stops >= 3
    _assert_same_run(interrupted, unbroken)


def test_ctrl_c_dropped_in_a_gc_callback_still_stops_the_run(tmp_path):
    # JAX's gc callback (_xla_gc_callback) ran when a Ctrl-C came 2.5 s into
    # ppo: the KeyboardInterrupt was printed as "Exception ignored in ..." and
    # dropped, and the run finished with status 0.
    complete, code, stderr = _two_stage(tmp_path / "run", None, signal.SIGINT, "--sigint-in-gc")
    assert (complete, code, stderr) == (
        False, 130, ["interrupted during stage produce; rerun the same command to resume"])
    assert not (tmp_path / "run" / pipeline.LOCK).exists() and not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_the_tiny_run_with_one_line(tmp_path, signum, status):
    workdir = tmp_path / "run"
    code, stderr, _ = _interrupt_in(workdir, "sl_generate", 1.0, signum)
    assert code == status and stderr == ["interrupted during stage sl_generate; rerun the same command to resume"]
    assert not (workdir / pipeline.LOCK).exists() and not (workdir / "stages").exists()


# The whole-run tests below share one tiny run (minutes on two cores): slow,
# run with --runslow. The trainer-level guard and checkpoint tests above are fast.
@pytest.mark.slow
@pytest.mark.parametrize("stage, key, model", [
    ("sl_train", "sl_train.optimizer.learning_rate", "models/sl_cai"),
    ("pm_train", "pm_train.optimizer.learning_rate", "models/pm"),
    ("ppo", "ppo.policy_optimizer.learning_rate", "models/rl_cai"),
])
def test_a_nan_learning_rate_stops_the_stage_and_keeps_the_finished_work(tiny_run, tmp_path, stage, key, model):
    # The row: every parameter NaN, the stage "done", exit 0. And a rerun
    # that fails after a config change had deleted models/rl_cai and ppo/.
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    before = _snapshot(workdir)
    code, _, stderr = _run(workdir, f"--stages={stage}", f"--config.{key}=nan")
    assert code == 2 and len(stderr) == 1, stderr[-20:]
    assert stderr[0].startswith(f"error: stage {stage}: ") and " is nan; stopped before saving" in stderr[0]
    assert " step 1: " in stderr[0] or "ppo iteration 1, " in stderr[0]
    assert _snapshot(workdir) == before  # models, checkpoints, manifests, config.json
    assert not (workdir / ".staging" / stage / model).exists()  # nothing NaN saved anywhere
    # Rerun at the old settings: complete as it was, the failed attempt's work
    # cleared, and the PPO checkpoints eval compares still recorded.
    code, stdout, stderr = _run(workdir, f"--stages={stage}")
    assert code == 0, stderr[-20:]
    assert f"| {stage} | skipped (complete)" in stdout
    assert not (workdir / ".staging" / stage).exists()
    assert [step for step, _ in rl_checkpoints(str(workdir / "models" / "rl_cai"))] == [1, 2]


@pytest.mark.slow
def test_a_moved_run_reruns_nothing(tiny_run, tmp_path):
    # Fingerprints hold no absolute path (the constitution counts by its text,
    # models by their weights): a run copied elsewhere is complete there.
    workdir = tmp_path / "elsewhere" / "run"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    code, stdout, stderr = _run(workdir)
    assert code == 0, stderr[-20:]
    for stage in pipeline.ORDER:
        assert f"| {stage} | skipped (complete)" in stdout, stdout


@pytest.mark.slow
def test_flipped_bytes_in_a_saved_model_rerun_its_stage(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    _flip_bytes(_largest_file(workdir / "models" / "pm"))  # the largest file of the PM's weights
    code, stdout, stderr = _run(workdir, "--stages=pm_train")
    assert code == 0, stderr[-20:]
    assert "pm_train: models/pm changed since it was made; rerunning" in stdout
    assert artifacts.content_fingerprint(str(workdir / "models" / "pm")) == \
        json.loads((workdir / "stages" / "pm_train.json").read_text())["outputs"]["models/pm"]


# ------------------------------------------------------------ fault injection: kills at random points

DATA = ("sl_data.jsonl", "helpful_data.jsonl", "pairs.jsonl", "labels.jsonl")
MODELS = ("models/sl_cai", "models/pm", "models/rl_cai/step_2", "models/rl_cai/step_2/value")


def _same_result(workdir, expected) -> None:
    """The run's data files byte for byte and its models' weights value for
    value (orbax names its files at random, so not their bytes)."""
    import orbax.checkpoint as ocp

    for rel in DATA:
        assert artifacts.file_hash(str(workdir / rel)) == artifacts.file_hash(str(expected / rel)), rel
    for rel in MODELS:
        got, want = (ocp.PyTreeCheckpointer().restore(str(w / rel / "params")) for w in (workdir, expected))
        assert jax.tree.structure(got) == jax.tree.structure(want), rel
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=rel)


def _kill_in(workdir, stage: str, delay: float) -> bool:
    """Starts the run, waits until `stage` is running, SIGKILLs the run `delay`
    seconds later. False when the stage was already complete (nothing killed)."""
    return _interrupt_in(workdir, stage, delay, signal.SIGKILL)[2]


def _interrupt_in(workdir, stage: str, delay: float, signum) -> tuple[int, list[str], bool]:
    """Starts the run, waits until `stage` is running, sends the run `signum`
    `delay` seconds later. Returns its exit status, its stderr lines and
    whether the signal landed in the stage (False when it was complete)."""
    proc = subprocess.Popen(_main(workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    started, done = workdir / ".staging" / f"{stage}.started.json", workdir / "stages" / f"{stage}.json"
    landed = False
    try:
        while proc.poll() is None and not started.exists() and not done.exists():
            time.sleep(0.1)
        if not (done.exists() and not started.exists()):
            time.sleep(delay)
            landed = proc.poll() is None and not done.exists()  # the signal lands in the stage
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=300)
    return proc.returncode, err.strip().splitlines(), landed


@pytest.mark.slow
def test_runs_killed_at_random_points_of_every_stage_resume_to_the_unbroken_result(tiny_run, tmp_path):
    """Three SIGKILLs per stage at seeded random times after the stage starts
    (some land in the swap-in); each resume starts from what the kill left,
    and the finished run's data and weights equal an unbroken run's."""
    from cai_jax.pipeline import ORDER

    workdir, draw = tmp_path / "run", random.Random(19)
    # Tiny stages last seconds (most of it loading and compiling): short delays
    # land inside them; a stage that finished anyway is killed no more.
    kills = {stage: sum(_kill_in(workdir, stage, draw.uniform(0.0, 6.0)) for _ in range(3)) for stage in ORDER}
    code, stdout, stderr = _run(workdir)
    assert code == 0, stderr[-20:]
    assert sum(kills.values()) >= len(ORDER), kills
    _same_result(workdir, tiny_run)
    assert not (workdir / ".staging").exists()
    # The manifests too: what each stage was made from and made (models by
    # their weights' fingerprints, not orbax's random file names).
    got, want = _manifests(workdir), _manifests(tiny_run)
    assert set(got) == set(want)
    for name in want:
        assert got[name]["fingerprint"] == want[name]["fingerprint"], name
        if name != "eval.json":
            assert got[name]["outputs"] == want[name]["outputs"], name
    # Eval's Elo file names the run's own directory (its models' sources),
    # which differs here: the same but for it. (Its report.md states how long
    # each stage took, so it differs between any two runs.)
    assert (workdir / "eval" / "elo.json").read_text().replace(str(workdir), "DIR") == \
        (tiny_run / "eval" / "elo.json").read_text().replace(str(tiny_run), "DIR")


@pytest.mark.slow
def test_runs_interrupted_at_random_points_of_every_stage_resume_to_the_unbroken_result(tiny_run, tmp_path):
    """A SIGINT (SIGTERM for every other stage) at a seeded random time after
    each stage starts: one line, status 130 (143), the lock released, and the
    run resumed from there ends with the data and weights of an unbroken run."""
    from cai_jax.pipeline import ORDER

    workdir, draw, landed = tmp_path / "run", random.Random(2), 0
    for i, stage in enumerate(ORDER):
        signum = (signal.SIGINT, signal.SIGTERM)[i % 2]
        code, stderr, inside = _interrupt_in(workdir, stage, draw.uniform(0.0, 6.0), signum)
        assert not (workdir / pipeline.LOCK).exists()
        landed += inside
        if code in (0, -signum) and stage == ORDER[-1] and not inside:
            continue  # the run had finished (a signal in Python's last teardown kills it, as before)
        assert code == 128 + signum and len(stderr) == 1 and re.match(INTERRUPTED, stderr[0]), (stage, stderr)
    code, stdout, stderr = _run(workdir)
    assert code == 0, stderr[-20:]
    assert landed >= len(ORDER) // 2
    _same_result(workdir, tiny_run)
    assert not (workdir / ".staging").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the modes say")
def test_a_finished_run_in_a_read_only_directory_reruns_as_a_no_op_without_writing(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    dirs = [workdir, *(p for p in workdir.rglob("*") if p.is_dir() and not p.is_symlink())]
    for path in dirs:
        path.chmod(0o555)
    try:
        before = {str(p): p.stat().st_mtime_ns for p in [workdir, *workdir.rglob("*")]}
        code, stdout, stderr = _run(workdir)
        assert code == 0, stderr[-20:]
        assert f"{workdir} is not writable: every stage asked for is complete, so nothing was written" in stdout
        assert stdout.count("skipped (complete)") == len(pipeline.ORDER)
        assert {str(p): p.stat().st_mtime_ns for p in [workdir, *workdir.rglob("*")]} == before
        code, _, stderr = _run(workdir, "--stages=eval", "--force")
        assert code == 2 and stderr == [f"error: {workdir} is not writable, and stage eval must run (forced "
                                        "(--force)); make it writable or choose another --workdir"]
    finally:
        for path in dirs:
            path.chmod(0o755)
