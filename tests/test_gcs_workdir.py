"""Work directories on Cloud Storage, against a real GCS API: fake-gcs-server
on 127.0.0.1 (tests/gcs_emulator.py), found through STORAGE_EMULATOR_HOST as
a real client finds it. Nothing here mocks Cloud Storage."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from cai_jax import pipeline, storage
from cai_jax.errors import UserError

from gcs_emulator import Emulator, EmulatorUnavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "runs"


@pytest.fixture(scope="module")
def emulator():
    try:
        server = Emulator().start()
    except EmulatorUnavailable as e:
        pytest.skip(f"no GCS emulator: {e}")
    server.make_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                                            "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
    for key in saved:
        os.environ.pop(key, None)
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    storage.point_clients_at_emulator()
    storage._FS = None  # the next call makes a client for the emulator
    yield server
    storage._FS = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def url(emulator):
    """A fresh work directory in the emulator's bucket."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:8]}"


def _main(workdir, *extra):
    return [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--noprogress", *extra]


def _env(**extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **extra}


def _run(workdir, *extra, env=None, timeout=900):
    out = subprocess.run(_main(workdir, *extra), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env=env or _env())
    return out.returncode, out.stdout, _own_lines(out.stderr)


def _own_lines(stderr: str) -> list[str]:
    """stderr without what libtpu and tensorstore print at start-up on any machine."""
    noise = ("TPU", "libtpu", "InitGoogle", "Source Location", "tfrc", "google_auth_provider")
    return [line for line in stderr.strip().splitlines() if line and not any(n in line for n in noise)]


def _manifests(workdir) -> dict:
    """The run's stage manifests without their timing (paths never enter them)."""
    out = {}
    for name in pipeline.ORDER:
        path = storage.join(workdir, "stages", f"{name}.json")
        if storage.exists(path):
            out[name] = {k: v for k, v in json.loads(storage.read_text(path)).items() if k != "seconds"}
    return out


def _names(url) -> list[str]:
    """What a work directory holds (Cloud Storage has no empty directories)."""
    return sorted(storage.listdir(url)) if storage.exists(url) else []


# ------------------------------------------------------------------ the file layer

def test_the_file_layer_reads_writes_lists_and_deletes_objects(url):
    storage.write_atomic(storage.join(url, "a", "b.json"), '{"x": 1}')
    assert storage.read_text(storage.join(url, "a", "b.json")) == '{"x": 1}'
    assert storage.isdir(storage.join(url, "a")) and storage.isfile(storage.join(url, "a", "b.json"))
    storage.append(storage.join(url, "log.jsonl"), "1\n")
    storage.append(storage.join(url, "log.jsonl"), "2\n")
    assert storage.read_text(storage.join(url, "log.jsonl")) == "1\n2\n"
    assert list(storage.walk(url)) == [(url, ["a"], ["log.jsonl"]), (storage.join(url, "a"), [], ["b.json"])]
    storage.copy_tree(storage.join(url, "a"), storage.join(url, "c"))
    storage.rmtree(storage.join(url, "a"))
    assert sorted(storage.listdir(url)) == ["c", "log.jsonl"]
    assert storage.read_text(storage.join(url, "c", "b.json")) == '{"x": 1}'
    with pytest.raises(FileNotFoundError):
        storage.remove(storage.join(url, "a", "b.json"))


def test_an_object_is_created_only_if_absent(url):
    lock = storage.join(url, ".lock")
    assert storage.create_exclusive(lock, b"first")
    assert not storage.create_exclusive(lock, b"second")
    assert storage.read_text(lock) == "first"


def test_a_reader_never_sees_a_partial_artifact(url):
    """A writer rewrites a 2 MB JSONL artifact again and again while a reader
    reads it: every read is one whole version (each line the same record,
    as many lines as that version has)."""
    path = storage.join(url, "pairs.jsonl")
    versions = [[{"v": v, "i": i, "pad": "x" * 200} for i in range(8000 + 500 * v)] for v in range(6)]
    from cai_jax import artifacts
    artifacts.write_jsonl_atomic(path, versions[0])
    done, seen = threading.Event(), set()

    def write():
        for records in versions[1:]:
            artifacts.write_jsonl_atomic(path, records)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set() or len(seen) < 2:
        records = artifacts.read_jsonl(path)
        v = records[0]["v"]
        assert records == versions[v], f"a read saw a mix of versions or a part of version {v}"
        seen.add(v)
        if done.is_set() and len(seen) < 2:
            break
    writer.join()
    assert artifacts.read_jsonl(path) == versions[-1]


# ------------------------------------------------------------------ the lock

def test_a_second_run_is_refused_by_the_lock_and_a_dead_runs_lock_is_taken_over(url):
    storage.makedirs(url)
    with pipeline.workdir_lock(url):
        held = json.loads(storage.read_text(storage.join(url, pipeline.LOCK)))
        assert held["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"work directory {url} is in use by pid {os.getpid()}"):
            with pipeline.workdir_lock(url):
                pass
    assert not storage.exists(storage.join(url, pipeline.LOCK)), "released at the end"

    # A lock left by a process that is gone (on this host) is stale: taken over.
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    storage.write_atomic(storage.join(url, pipeline.LOCK), json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "token": "old"}))
    with pipeline.workdir_lock(url):
        assert json.loads(storage.read_text(storage.join(url, pipeline.LOCK)))["pid"] == os.getpid()
    assert _names(url) == [], "the claim and the lock are gone"


def test_processes_racing_to_take_over_a_stale_lock_on_gcs_end_with_one_holder(url):
    """tests/test_pipeline.py's race, on the bucket: 6 processes at once find
    the lock of a dead process; one takes it over, the others are refused."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "scripts", "lock_race.py"), url, "15", "6"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {"trials": 15, "two_holders": 0, "errors": [], "unheld": 0}


def test_a_concurrent_run_on_the_same_bucket_directory_is_refused(url, tmp_path):
    """A real second run (a new process) while the first holds the lock:
    one line naming the holder, exit status 2, nothing written."""
    storage.makedirs(url)
    with pipeline.workdir_lock(url):
        code, stdout, stderr = _run(url, "--stages=sl_generate")
        assert _names(url) == [".lock"], "nothing written"
    assert code == 2, stderr
    assert stderr == [f"error: work directory {url} is in use by pid {os.getpid()} on {socket.gethostname()} "
                      f"(lock {url}/.lock); wait for that run to end, or delete the lock if it is gone"]


# ------------------------------------------------------------------ bad input

def test_a_missing_bucket_is_one_line_naming_the_url(emulator):
    with pytest.raises(UserError, match=r"^cannot use the work directory gs://no-such-bucket/run: "
                                        r"bucket no-such-bucket does not exist \(the emulator at "):
        pipeline.run_pipeline(None, "gs://no-such-bucket/run", ["sl_generate"])


def test_an_unreachable_emulator_is_one_line_naming_the_url_and_exit_2():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, stdout, stderr = _run("gs://runs/x", env=_env(STORAGE_EMULATOR_HOST=f"127.0.0.1:{port}"), timeout=300)
    assert code == 2, stderr
    assert len(stderr) == 1 and stderr[0].startswith(
        f"error: cannot reach the work directory gs://runs/x (the emulator at STORAGE_EMULATOR_HOST="
        f"http://127.0.0.1:{port}): "), stderr


# ------------------------------------------------------------------ the pipeline on gs://

def test_a_stage_runs_on_gcs_and_a_second_run_skips_it(url):
    code, stdout, stderr = _run(url, "--stages=sl_generate")
    assert code == 0, stderr[-20:]
    assert "| sl_generate | done" in stdout
    names = storage.listdir(url)
    assert {"sl_data.jsonl", "helpful_data.jsonl", "stages", "config.json"} <= set(names)
    assert ".lock" not in names and ".staging" not in names
    made = storage.read_text(storage.join(url, "sl_data.jsonl"))
    code, stdout, stderr = _run(url, "--stages=sl_generate")
    assert code == 0, stderr[-20:]
    assert "| sl_generate | skipped (complete)" in stdout
    assert storage.read_text(storage.join(url, "sl_data.jsonl")) == made


@pytest.mark.slow  # about 100 s on two cores
def test_the_tiny_pipeline_finishes_on_gcs_and_a_second_run_skips_every_stage(url):
    code, stdout, stderr = _run(url)
    assert code == 0, stderr[-30:]
    assert all(f"| {name} | done" in stdout for name in pipeline.ORDER), stdout
    for rel in ("report.md", "eval/elo.json", "models/sl_cai/saved.json", "models/rl_cai/checkpoints.json",
                "sl_train/metrics.jsonl", "eval/harmless_vs_helpful.png"):
        assert storage.isfile(storage.join(url, rel)), rel
    assert any(name.startswith("events.out.tfevents")
               for _, _, files in storage.walk(storage.join(url, "sl_train", "tensorboard")) for name in files)
    assert f"Work directory: `{url}`" in storage.read_text(storage.join(url, "report.md"))
    code, stdout, stderr = _run(url)
    assert code == 0, stderr[-30:]
    assert all(f"| {name} | skipped (complete)" in stdout for name in pipeline.ORDER), stdout


# SL-CAI on the tiny model with a checkpoint per step, for a kill between them.
_SL = ("--stages=sl_generate,sl_train", "--config.sl_train.num_steps=4", "--config.sl_train.save_every=1")


@pytest.mark.slow  # about 110 s on two cores
def test_a_run_killed_on_gcs_resumes_and_makes_what_a_local_unbroken_run_makes(url, tmp_path):
    local = tmp_path / "local"
    code, _, stderr = _run(local, *_SL)
    assert code == 0, stderr[-20:]

    proc = subprocess.Popen(_main(url, *_SL), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=_env())
    saved = storage.join(url, ".staging", "sl_train", "sl_train", "checkpoints.checksums.json")
    try:
        while proc.poll() is None and not storage.exists(saved):
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "sl_train finished before the kill"
    assert not storage.exists(storage.join(url, "stages", "sl_train.json"))

    code, stdout, stderr = _run(url, *_SL)
    assert code == 0, stderr[-20:]
    assert "| sl_generate | skipped (complete)" in stdout and "| sl_train | done" in stdout
    assert "taking over the stale lock" in stdout
    # Same fingerprints of every output (data files by their bytes, the model by its weights).
    assert _manifests(url) == _manifests(str(local))
