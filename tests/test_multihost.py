"""Two JAX processes on 127.0.0.1 (4 CPU devices each, gloo collectives) train
like one process with 8 devices: the multi-host code path without a pod."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "scripts", "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, WORKER, f"--out={out}", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, name) -> str:
    try:
        output, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{name} timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, f"{name} failed:\n{output[-3000:]}"
    return output


def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
    port = _free_port()
    multi_out, single_out = tmp_path / "multi.npz", tmp_path / "single.npz"
    procs = {f"process {i}": _start(multi_out if i == 0 else tmp_path / f"unused{i}.npz", "--mode=multi",
                                    f"--process_id={i}", "--num_processes=2", f"--port={port}")
             for i in range(2)}
    procs["single process"] = _start(single_out, "--mode=single")
    for name, proc in procs.items():
        _wait(proc, name)
    multi, single = np.load(multi_out), np.load(single_out)
    # Each host read its own shard, and together they saw the single run's examples.
    np.testing.assert_array_equal(multi["ids"], single["ids"])
    assert len(set(multi["ids"].tolist())) == len(multi["ids"]), "the hosts' shards overlap"
    params = [k for k in single.files if k not in ("loss", "ids", "moved")]
    assert params and sorted(params) == sorted(k for k in multi.files if k not in ("loss", "ids", "moved"))
    assert float(single["moved"]) > 1e-3  # training changed the parameters
    assert abs(float(multi["loss"]) - float(single["loss"])) < 1e-5
    for key in params:
        np.testing.assert_allclose(multi[key], single[key], atol=1e-5, err_msg=key)
    assert not os.path.exists(tmp_path / "unused1.npz")  # only process 0 writes
