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


class _Calls(list):
    """The stages run, in order; `kill_first` non-empty makes `first` die."""
    kill_first: list


@pytest.fixture
def fake_stages(monkeypatch):
    """Two stages: `first` writes one.txt (resuming first.partial, its scratch),
    `second` reads one.txt and writes two.txt. `kill_first` makes `first` die
    after writing its scratch."""
    calls = _Calls()
    calls.kill_first = kill_first = []

    def first(ctx):
        calls.append("first")
        partial = ctx.path("first.partial")
        resumed = os.path.exists(partial)
        with open(partial, "a") as f:
            f.write(f"{ctx.config.a.x}\n")
        if kill_first:
            raise KeyboardInterrupt("killed")
        with open(ctx.path("one.txt"), "w") as f:
            f.write(f"first:{ctx.config.a.x}")
        os.rename(partial, ctx.path("first.log"))
        return {"resumed": resumed}

    def second(ctx):
        calls.append("second")
        with open(ctx.path("one.txt")) as f, open(ctx.path("two.txt"), "w") as g:
            g.write(f"second({f.read()}):{ctx.config.b.y}")
        return {"wrote": "two.txt"}

    module = type(sys)("fake_stages_module")
    module.first, module.second = first, second
    sys.modules["fake_stages_module"] = module
    monkeypatch.setattr(pipeline, "STAGES", {
        "first": pipeline.Stage("first", "fake_stages_module:first", ("a",), outputs=("one.txt",),
                                scratch=("first.partial",)),
        "second": pipeline.Stage("second", "fake_stages_module:second", ("b",), inputs=("one.txt",),
                                 outputs=("two.txt",)),
    })
    monkeypatch.setattr(pipeline, "ORDER", ("first", "second"))
    return calls


def _config(x=1, y=2):
    return ml_collections.ConfigDict({"a": {"x": x}, "b": {"y": y}})


def test_complete_stages_are_skipped_and_changes_rerun_downstream(fake_stages, tmp_path, capsys):
    rows = pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert fake_stages == ["first", "second"] and all(r["status"].startswith("done") for r in rows)
    rows = pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert fake_stages == ["first", "second"] and all(r["status"].startswith("skipped") for r in rows)
    capsys.readouterr()
    pipeline.run_pipeline(_config(y=3), str(tmp_path), progress=False)  # only `second` reads b
    assert fake_stages == ["first", "second", "second"]
    assert "second: config section b changed; rerunning" in capsys.readouterr().out
    pipeline.run_pipeline(_config(x=5, y=3), str(tmp_path), progress=False)  # upstream rerun -> both
    assert fake_stages == ["first", "second", "second", "first", "second"]
    assert "second: input one.txt changed; rerunning" in capsys.readouterr().out
    assert (tmp_path / "two.txt").read_text() == "second(first:5):3"


def test_a_deleted_or_edited_output_reruns_its_stage_and_says_why(fake_stages, tmp_path, capsys):
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    capsys.readouterr()
    (tmp_path / "two.txt").unlink()
    rows = pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert fake_stages == ["first", "second", "second"] and rows[0]["status"].startswith("skipped")
    assert "second: two.txt is missing; rerunning" in capsys.readouterr().out
    (tmp_path / "two.txt").write_text("edited by hand")
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert fake_stages[-1] == "second" and len(fake_stages) == 4
    assert "second: two.txt changed since it was made; rerunning" in capsys.readouterr().out
    assert (tmp_path / "two.txt").read_text() == "second(first:1):2"
    # An edited output upstream: `first` remakes it; `second` stays, since its
    # input is back to the content it was made from.
    (tmp_path / "one.txt").write_text("first:999")
    rows = pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert "first: one.txt changed since it was made; rerunning" in capsys.readouterr().out
    assert fake_stages[4:] == ["first"] and rows[1]["status"] == "skipped (complete)"
    assert (tmp_path / "one.txt").read_text() == "first:1"


def test_a_changed_input_file_reruns_the_stage(fake_stages, tmp_path, capsys):
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    capsys.readouterr()
    # Same path, new content, and `first` not asked to run: `second` notices the content.
    (tmp_path / "one.txt").write_text("first:other")
    pipeline.run_pipeline(_config(), str(tmp_path), stages=["second"], progress=False)
    assert fake_stages == ["first", "second", "second"]
    assert "second: input one.txt changed; rerunning" in capsys.readouterr().out
    assert (tmp_path / "two.txt").read_text() == "second(first:other):2"
    pipeline.run_pipeline(_config(), str(tmp_path), stages=["second"], progress=False)
    assert len(fake_stages) == 3


def test_scratch_is_kept_after_a_kill_and_discarded_after_a_config_change(fake_stages, tmp_path, capsys):
    fake_stages.kill_first.append(True)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(_config(x=1), str(tmp_path), progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed again, same config: the scratch is resumed
        pipeline.run_pipeline(_config(x=1), str(tmp_path), progress=False)
    assert (tmp_path / "first.partial").read_text() == "1\n1\n"
    # Another config: the pipeline throws the old scratch away before the stage runs.
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(_config(x=2), str(tmp_path), progress=False)
    assert (tmp_path / "first.partial").read_text() == "2\n"
    assert "first: discarded partial work" in capsys.readouterr().out
    fake_stages.kill_first.clear()
    rows = pipeline.run_pipeline(_config(x=2), str(tmp_path), progress=False)  # resumes, finishes
    assert rows[0]["resumed"] is True and (tmp_path / "first.log").read_text() == "2\n2\n"
    manifest = json.loads((tmp_path / "stages" / "first.json").read_text())
    assert set(manifest["outputs"]) == {"one.txt"} and manifest["summary"] == {"resumed": True}


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


def test_a_constitution_edited_in_place_changes_the_fingerprint_of_stages_that_read_it(tmp_path):
    from cai_jax.config import load_config
    from cai_jax.constitution import default_constitution_path

    path = tmp_path / "mine.json"
    path.write_text(open(default_constitution_path()).read())
    config = load_config("configs/tiny.py", [f"constitution.path={path}"])
    before = {s: pipeline.stage_fingerprint(config, str(tmp_path), s)["config"] for s in ("pairs", "pm_train")}
    data = json.loads(path.read_text())
    data["contrastive_framings"] = data["contrastive_framings"][:1]
    path.write_text(json.dumps(data))  # same path, same config, new content
    after = {s: pipeline.stage_fingerprint(config, str(tmp_path), s)["config"] for s in ("pairs", "pm_train")}
    assert before["pairs"]["constitution"] != after["pairs"]["constitution"]
    assert before["pm_train"] == after["pm_train"]  # pm_train does not read the constitution
