"""The pipeline: skip/rerun logic on fake stages, and the whole recipe on the
tiny model, killed mid-stage and resumed to completion."""
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from cai_jax import pipeline

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture
def fake_stages(monkeypatch):
    calls = []

    def make(name, output):
        def run(ctx):
            calls.append(name)
            with open(ctx.path(output), "w") as f:
                f.write(f"{name}:{ctx.config.a.x}:{ctx.config.b.y}")
            return {"wrote": output}
        return run

    module = type(sys)("fake_stages_module")
    module.first = make("first", "one.txt")
    module.second = make("second", "two.txt")
    sys.modules["fake_stages_module"] = module
    monkeypatch.setattr(pipeline, "STAGES", {
        "first": ("fake_stages_module:first", ("a",), ()),
        "second": ("fake_stages_module:second", ("b",), ("one.txt",)),
    })
    monkeypatch.setattr(pipeline, "ORDER", ("first", "second"))
    return calls


def _config(x=1, y=2):
    return ml_collections.ConfigDict({"a": {"x": x}, "b": {"y": y}})


def test_complete_stages_are_skipped_and_changes_rerun_downstream(fake_stages, tmp_path):
    rows = pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert fake_stages == ["first", "second"] and all(r["status"].startswith("done") for r in rows)
    rows = pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert fake_stages == ["first", "second"] and all(r["status"].startswith("skipped") for r in rows)
    pipeline.run_pipeline(_config(y=3), str(tmp_path), progress=False)  # only `second` reads b
    assert fake_stages == ["first", "second", "second"]
    pipeline.run_pipeline(_config(x=5, y=3), str(tmp_path), progress=False)  # upstream rerun -> both
    assert fake_stages == ["first", "second", "second", "first", "second"]
    assert (tmp_path / "two.txt").read_text() == "second:5:3"


def test_missing_inputs_and_unknown_stages_are_clear_errors(fake_stages, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stage second needs \['one.txt'\]"):
        pipeline.run_pipeline(_config(), str(tmp_path), stages=["second"], progress=False)
    with pytest.raises(ValueError, match="unknown stages"):
        pipeline.run_pipeline(_config(), str(tmp_path), stages=["bogus"], progress=False)


def _main(workdir, *extra):
    return [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--noprogress", *extra]


def test_tiny_pipeline_killed_mid_stage_resumes_to_completion(tmp_path):
    workdir = tmp_path / "run"
    # First run: kill it once the PPO stage has started (after its first checkpoint if possible).
    proc = subprocess.Popen(_main(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    target = workdir / "ppo" / "ckpt"
    while time.time() < deadline and proc.poll() is None and not target.exists():
        time.sleep(0.5)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed, "the pipeline finished before it could be killed"
    done_before = sorted(p.stem for p in (workdir / "stages").glob("*.json") if ".started" not in p.name)
    assert "ppo" not in done_before and "pm_train" in done_before

    out = subprocess.run(_main(workdir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    for stage in done_before:
        assert f"| {stage} | skipped (complete)" in table, stage
    assert "| ppo | done" in table and "| eval | done" in table
    report = (workdir / "report.md").read_text()
    from cai_jax.eval.report import SECTIONS
    for heading in SECTIONS:
        assert f"## {heading}" in report, heading
    ppo_rows = [json.loads(line) for line in open(workdir / "ppo" / "metrics.jsonl")]
    iterations = [r["step"] for r in ppo_rows if "reward_mean" in r]
    assert iterations == sorted(set(iterations)), "a resumed PPO logs each iteration once"
