"""The pipeline (`python -m cai_jax.main`) as two processes on 127.0.0.1 (4 CPU
devices each, gloo collectives) against one process with all 8 devices, a
process lost mid-stage, and processes that do not share a work directory.

The mesh is data-parallel (data=8): each device holds the whole model and
its own rows, so generation and scoring do the same arithmetic in both
layouts and their files are equal byte for byte. (With fsdp or tensor axes a
product's contraction is split over devices and summed in a collective; so
is a training step's gradient here.) XLA:CPU's in-process all-reduce and
gloo's sum the 8 devices' gradients in different orders, so trained weights,
and the numbers computed from them, agree to rounding, not bit for bit: the
tolerance is 1e-6, and the runs differ by about 1e-8.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_gcs_workdir import BUCKET as GCS_BUCKET, emulator  # noqa: F401 (a fake-gcs-server fixture)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GLOBAL_DEVICES = 8
MESH = ["--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
# Every batch fills the 8 devices of the mesh's batch axes.
BATCHES = ["--config.sl_train.batch_size=8", "--config.pm_train.batch_size=8",
           "--config.ppo.rollout_batch_size=8", "--config.ppo.minibatch_size=8"]
HEARTBEAT = 10  # seconds: a lost process is noticed after this (the default is 60)
SHORT = ["--stages=sl_generate,sl_train", "--config.data.red_team_limit=2", "--config.data.helpful_limit=2",
         "--config.sl_train.num_steps=3", "--config.sl_train.save_every=1"]
LOST_BOUND = 120  # seconds: the bound for the others to stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """`cai_jax.main` as `n` processes sharing `GLOBAL_DEVICES` CPU devices,
    each process's stdout and stderr in files beside the work directory."""

    def __init__(self, tmp_path, name: str, workdirs: list, args: list):
        self.n, self.logs = len(workdirs), tmp_path / f"{name}-logs"
        self.logs.mkdir(exist_ok=True)
        port = _free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={GLOBAL_DEVICES // self.n}")
        self.procs = []
        for i, workdir in enumerate(workdirs):
            distributed = [] if self.n == 1 else [
                "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={self.n}", f"--config.distributed.process_id={i}",
                f"--config.distributed.heartbeat_timeout_seconds={HEARTBEAT}"]
            argv = [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                    "--noprogress", *MESH, *BATCHES, *args, *distributed]
            with open(self.logs / f"{i}.out", "w") as out, open(self.logs / f"{i}.err", "w") as err:
                self.procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err))

    def wait(self, timeout: float = 900) -> list:
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in self.procs:
                    p.kill()
                pytest.fail(f"process {i} of {self.n} did not end in {timeout} s:\n{self.stderr(i)[-3000:]}")
        return [p.returncode for p in self.procs]

    def finish(self, timeout: float = 900) -> None:
        codes = self.wait(timeout)
        for i, code in enumerate(codes):
            assert code == 0, f"process {i} of {self.n} exited {code}:\n{self.stderr(i)[-3000:]}"

    def stderr(self, i: int) -> str:
        return (self.logs / f"{i}.err").read_text()


def _records(path) -> list:
    return [json.loads(line) for line in open(path)]


def _params(model_dir) -> dict:
    import jax
    from cai_jax.weights.model_dir import load_model_dir
    _, params = load_model_dir(str(model_dir))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_weights(a, b, atol: float = 1e-6) -> float:
    """Every parameter of two model directories within `atol`; returns the largest difference."""
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    worst = max(float(np.max(np.abs(pa[k].astype(np.float64) - pb[k].astype(np.float64)))) for k in pa)
    assert worst <= atol, f"{a} and {b} differ by {worst}"
    return worst


def assert_close(a, b, rel: float = 1e-6, path: str = "") -> None:
    """Equal JSON values, numbers within `rel` (relative, or absolute near 0)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for key in a:
            assert_close(a[key], b[key], rel, f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert abs(a - b) <= rel * max(1.0, abs(a), abs(b)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _kill_process_1_in_training(run: Run, workdir) -> float:
    """SIGKILLs process 1 once sl_train has saved a checkpoint (inside the
    stage, with steps to go); returns when."""
    checkpoints = workdir / ".staging" / "sl_train" / "sl_train" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert all(p.poll() is None for p in run.procs), "a process ended before sl_train saved"
        assert time.monotonic() < deadline, "sl_train saved no checkpoint in 600 s"
        time.sleep(0.1)
    run.procs[1].send_signal(signal.SIGKILL)
    return time.monotonic()


# Slow (94-130 s, the suite's longest): the default suite keeps the start-up
# check below and tests/test_multihost.py's two-process training step.
@pytest.mark.slow
def test_two_processes_make_the_run_of_one_and_resume_after_losing_one(tmp_path):
    """sl_generate and sl_train as 1 x 8 devices and as 2 x 4; the second loses
    process 1 (SIGKILL) inside sl_train: process 0 stops within the bound with
    one line naming it, and relaunching both finishes the run, equal to the
    single process's."""
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    Run(tmp_path, "single", [single_dir], SHORT).finish()

    broken = Run(tmp_path, "broken", [multi_dir] * 2, SHORT)
    killed_at = _kill_process_1_in_training(broken, multi_dir)
    code = broken.wait()[0]
    noticed = time.monotonic() - killed_at
    print(f"process 0 stopped {noticed:.1f} s after process 1 was killed (heartbeat timeout {HEARTBEAT} s)")
    lines = broken.stderr(0).strip().splitlines()
    assert code == 1, broken.stderr(0)[-3000:]
    assert noticed < LOST_BOUND
    assert lines[-1].startswith("error: lost process 1 of 2"), lines[-5:]
    assert "Traceback" not in broken.stderr(0) and sum(line.startswith("error:") for line in lines) == 1
    assert not (multi_dir / "stages" / "sl_train.json").exists()  # killed inside the stage

    resumed = Run(tmp_path, "resumed", [multi_dir] * 2, SHORT)
    resumed.finish()
    out = (resumed.logs / "0.out").read_text()
    assert "| sl_generate | skipped (complete)" in out  # finished before the kill
    assert "| sl_train | done" in out

    for name in ("sl_data.jsonl", "helpful_data.jsonl"):
        assert (single_dir / name).read_bytes() == (multi_dir / name).read_bytes(), name
    assert_close(_records(single_dir / "sl_train/metrics.jsonl"), _records(multi_dir / "sl_train/metrics.jsonl"))
    assert_same_weights(single_dir / "models" / "sl_cai", multi_dir / "models" / "sl_cai")
    for stage in ("sl_generate", "sl_train"):
        manifests = [json.loads((d / "stages" / f"{stage}.json").read_text()) for d in (single_dir, multi_dir)]
        assert_close(manifests[0]["summary"], manifests[1]["summary"])
    # Only process 0 wrote: its lock and staging are gone, and process 1's log holds no report path.
    assert not (multi_dir / ".lock").exists() and not (multi_dir / ".staging").exists()


def test_processes_that_do_not_share_the_work_directory_stop_at_start_up(tmp_path):
    run = Run(tmp_path, "apart", [tmp_path / "a", tmp_path / "b"], SHORT)
    codes = run.wait(timeout=300)
    assert codes == [2, 2], [run.stderr(i)[-2000:] for i in range(2)]
    for i in range(2):
        lines = run.stderr(i).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: process 1 (") and "does not see the work " \
            f"directory {tmp_path / 'a'}" in lines[0], lines
    assert not (tmp_path / "b").exists()  # process 1 made nothing
    assert os.listdir(tmp_path / "a") == []  # process 0's lock is released


@pytest.mark.slow
def test_all_stages_on_two_processes_equal_one_process(tmp_path):
    """The whole tiny pipeline, 1 x 8 devices against 2 x 4: the same files
    from generation, the same weights and report numbers to rounding."""
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    start = time.monotonic()
    Run(tmp_path, "single", [single_dir], []).finish()
    single_seconds = time.monotonic() - start
    start = time.monotonic()
    Run(tmp_path, "multi", [multi_dir] * 2, []).finish()
    print(f"tiny pipeline: 1 x 8 devices {single_seconds:.0f} s, 2 x 4 devices {time.monotonic() - start:.0f} s")

    for name in ("sl_data.jsonl", "helpful_data.jsonl", "pairs.jsonl", "labels.jsonl"):
        assert (single_dir / name).read_bytes() == (multi_dir / name).read_bytes(), name
    worst = max(assert_same_weights(single_dir / "models" / m, multi_dir / "models" / m)
                for m in ("sl_cai", "pm", "pm_judge", "rl_cai/step_1", "rl_cai/step_2", "rl_cai/step_2/value"))
    print(f"largest weight difference: {worst:.3g}")
    # Downstream of training: the same answers, scores to rounding (stamps name
    # the weights' exact bytes, so they differ).
    for name in ("eval/answers.jsonl", "eval/judgments.jsonl", "eval/revision_scores.jsonl", "ppo/metrics.jsonl",
                 "sl_train/metrics.jsonl"):
        a, b = _records(single_dir / name), _records(multi_dir / name)
        drop = ("stamp", "id", "rollout_seconds", "update_seconds", "rollout_tokens_per_s", "update_tokens_per_s")
        assert_close([{k: v for k, v in r.items() if k not in drop} for r in a],
                     [{k: v for k, v in r.items() if k not in drop} for r in b], path=name)
    assert [r["answer"] for r in _records(single_dir / "eval/answers.jsonl")] == \
        [r["answer"] for r in _records(multi_dir / "eval/answers.jsonl")]
    # elo.json names the models by their paths, which differ by the work directory's.
    assert_close(json.loads((single_dir / "eval/elo.json").read_text().replace(str(single_dir), "W")),
                 json.loads((multi_dir / "eval/elo.json").read_text().replace(str(multi_dir), "W")))
    for stage in ("sl_generate", "sl_train", "pairs", "feedback", "pm_train", "ppo", "eval"):
        manifests = [json.loads((d / "stages" / f"{stage}.json").read_text()) for d in (single_dir, multi_dir)]
        assert_close(manifests[0]["summary"], manifests[1]["summary"], rel=1e-5, path=stage)


@pytest.mark.slow
def test_two_processes_on_a_bucket_make_the_files_of_one_local_process(tmp_path, emulator):
    """sl_generate and sl_train as 2 x 4 devices in a gs:// work directory
    (fake-gcs-server, tests/gcs_emulator.py) and as 1 x 8 on a local disk: the
    same generated files, the same weights to rounding; a second run skips both."""
    from cai_jax import storage

    url = f"gs://{GCS_BUCKET}/{tmp_path.name}"
    local = tmp_path / "local"
    Run(tmp_path, "local", [local], SHORT).finish()
    Run(tmp_path, "bucket", [url] * 2, SHORT).finish()
    for name in ("sl_data.jsonl", "helpful_data.jsonl"):
        assert storage.read_bytes(f"{url}/{name}") == (local / name).read_bytes(), name
    assert_same_weights(local / "models" / "sl_cai", f"{url}/models/sl_cai")  # orbax reads the bucket
    again = Run(tmp_path, "again", [url] * 2, SHORT)
    again.finish()
    assert (again.logs / "0.out").read_text().count("skipped (complete)") == 2
