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
from cai_jax.errors import UserError

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


class _Calls(list):
    """The stages run, in order; `kill_first` non-empty makes `first` die,
    `fail_first` makes it fail after writing its outputs."""
    kill_first: list
    fail_first: bool


@pytest.fixture
def fake_stages(monkeypatch):
    """Two stages: `first` writes one.txt (resuming first.partial, its scratch),
    `second` reads one.txt and writes two.txt. `kill_first` makes `first` die
    after writing its scratch."""
    calls = _Calls()
    calls.kill_first = kill_first = []
    calls.fail_first = False

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
        os.makedirs(ctx.path("model"), exist_ok=True)  # a directory output, like a saved model
        with open(ctx.path("model", "weights.bin"), "wb") as f:
            f.write(bytes(range(256)) * 64)
        # A trainer's output: a checkpoint (with its checksums file) and a log.
        os.makedirs(ctx.path("train", "ckpt", "1"), exist_ok=True)
        for name in ("train/ckpt/1/state.bin", "train/ckpt.checksums.json", "train/metrics.jsonl"):
            with open(ctx.path(*name.split("/")), "w") as f:
                f.write("{}")
        if calls.fail_first:
            raise RuntimeError("failed inside the stage")
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
        "first": pipeline.Stage("first", "fake_stages_module:first", ("a",), outputs=("one.txt", "model"),
                                scratch=("first.partial", "train")),
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
    staging = tmp_path / ".staging" / "first"  # a stage's work until it is complete
    assert (staging / "first.partial").read_text() == "1\n1\n"
    # Another config: the pipeline throws the old scratch away before the stage runs.
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(_config(x=2), str(tmp_path), progress=False)
    assert (staging / "first.partial").read_text() == "2\n"
    assert "first: discarded partial work" in capsys.readouterr().out
    fake_stages.kill_first.clear()
    rows = pipeline.run_pipeline(_config(x=2), str(tmp_path), progress=False)  # resumes, finishes
    assert rows[0]["resumed"] is True and (tmp_path / "first.log").read_text() == "2\n2\n"
    manifest = json.loads((tmp_path / "stages" / "first.json").read_text())
    assert set(manifest["outputs"]) == {"one.txt", "model"} and manifest["summary"] == {"resumed": True}


def test_a_finished_stage_keeps_its_logs_but_not_its_training_checkpoints(fake_stages, tmp_path):
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert (tmp_path / "train" / "metrics.jsonl").exists()
    assert not (tmp_path / "train" / "ckpt").exists()
    assert not (tmp_path / "train" / "ckpt.checksums.json").exists()


def _snapshot(workdir) -> dict:
    """Every file under `workdir` (the staging area aside) and its bytes."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and ".staging" not in p.parts}


def test_a_failed_rerun_leaves_the_finished_work_and_config_as_they_were(fake_stages, tmp_path):
    pipeline.run_pipeline(_config(x=1), str(tmp_path), progress=False)
    before = _snapshot(tmp_path)
    fake_stages.fail_first = True  # the rerun writes its outputs, then fails
    with pytest.raises(RuntimeError, match="failed inside the stage"):
        pipeline.run_pipeline(_config(x=2), str(tmp_path), progress=False)
    assert _snapshot(tmp_path) == before  # outputs, manifests, first.log, config.json
    assert json.loads((tmp_path / "config.json").read_text())["a"]["x"] == 1
    # The failed config's work stays in staging only; back at x=1 all is complete
    # and the leftovers of x=2 are cleared.
    rows = pipeline.run_pipeline(_config(x=1), str(tmp_path), progress=False)
    assert [r["status"] for r in rows] == ["skipped (complete)"] * 2
    assert not (tmp_path / ".staging" / "first").exists()


def test_a_swap_cut_short_by_a_kill_is_completed_by_the_next_run(fake_stages, tmp_path, monkeypatch, capsys):
    pipeline.run_pipeline(_config(x=1), str(tmp_path), progress=False)

    def killed(path):
        raise KeyboardInterrupt("killed mid-swap")
    with monkeypatch.context() as m:
        m.setattr(pipeline.artifacts, "follow_umask", killed)  # runs after the first move
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_pipeline(_config(x=2), str(tmp_path), stages=["first"], progress=False)
    capsys.readouterr()
    rows = pipeline.run_pipeline(_config(x=2), str(tmp_path), progress=False)
    assert "first: completed the swap-in a kill had cut short" in capsys.readouterr().out
    assert rows[0]["status"] == "skipped (complete)" and rows[1]["status"].startswith("done")
    assert fake_stages == ["first", "second", "first", "second"]
    assert (tmp_path / "two.txt").read_text() == "second(first:2):2"
    assert (tmp_path / "first.log").read_text() == "2\n"


def test_a_data_file_edited_in_place_reruns_the_stage_that_names_it(fake_stages, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "one"}\n')
    config = ml_collections.ConfigDict({"a": {"x": 1, "prompts": str(data)}, "b": {"y": 2}})
    pipeline.run_pipeline(config, str(tmp_path / "run"), progress=False)
    pipeline.run_pipeline(config, str(tmp_path / "run"), progress=False)
    assert fake_stages == ["first", "second"]
    capsys.readouterr()
    data.write_text('{"prompt": "two"}\n')  # same path, same config, new content
    pipeline.run_pipeline(config, str(tmp_path / "run"), progress=False)
    assert "first: config section a changed; rerunning" in capsys.readouterr().out
    assert fake_stages == ["first", "second", "first", "second"]


def test_a_moved_work_directory_and_data_file_rerun_nothing(fake_stages, tmp_path, capsys):
    # Files count by content (and name), not where they lie: a run moved to
    # another disk with its prompt file, or a checkout moved, is complete.
    (tmp_path / "old" / "data").mkdir(parents=True)
    (tmp_path / "old" / "data" / "prompts.jsonl").write_text('{"prompt": "one"}\n')

    def config(root):
        return ml_collections.ConfigDict({"a": {"x": 1, "prompts": str(root / "data" / "prompts.jsonl")},
                                          "b": {"y": 2}})
    pipeline.run_pipeline(config(tmp_path / "old"), str(tmp_path / "old" / "run"), progress=False)
    os.rename(tmp_path / "old", tmp_path / "new")
    rows = pipeline.run_pipeline(config(tmp_path / "new"), str(tmp_path / "new" / "run"), progress=False)
    assert fake_stages == ["first", "second"] and all(r["status"] == "skipped (complete)" for r in rows)
    # Another name is another file: prompts read from a file are named after it.
    os.rename(tmp_path / "new" / "data" / "prompts.jsonl", tmp_path / "new" / "data" / "other.jsonl")
    renamed = config(tmp_path / "new")
    renamed.a.prompts = str(tmp_path / "new" / "data" / "other.jsonl")
    capsys.readouterr()
    pipeline.run_pipeline(renamed, str(tmp_path / "new" / "run"), progress=False)
    assert "first: config section a changed; rerunning" in capsys.readouterr().out


def test_a_constitution_or_prompt_file_counts_by_content_not_by_where_it_lies(tmp_path):
    from cai_jax.config import load_config
    from cai_jax.constitution import default_constitution_path

    text = open(default_constitution_path()).read()
    prompts = json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
                          "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}) + "\n"
    fingerprints = {}
    for place in ("here", "there"):
        (tmp_path / place).mkdir()
        (tmp_path / place / "mine.json").write_text(text)
        (tmp_path / place / "red.jsonl").write_text(prompts)
        config = load_config("configs/tiny.py", [f"constitution.path={tmp_path / place / 'mine.json'}",
                                                 f"data.red_team={tmp_path / place / 'red.jsonl'}",
                                                 f"eval.feedback_judge.constitution={tmp_path / place / 'mine.json'}"])
        fingerprints[place] = {s: pipeline.stage_fingerprint(config, str(tmp_path / place), s)["config"]
                               for s in ("sl_generate", "pairs", "feedback", "eval")}
    assert fingerprints["here"] == fingerprints["there"]
    # The default constitution named by its path is the same constitution as "default".
    default = load_config("configs/tiny.py", [f"data.red_team={tmp_path / 'here' / 'red.jsonl'}"])
    named = load_config("configs/tiny.py", [f"constitution.path={default_constitution_path()}",
                                            f"data.red_team={tmp_path / 'here' / 'red.jsonl'}"])
    assert pipeline.stage_fingerprint(default, str(tmp_path), "pairs")["config"]["constitution"] == \
        pipeline.stage_fingerprint(named, str(tmp_path), "pairs")["config"]["constitution"]


def test_flipped_bytes_in_a_saved_directory_rerun_its_stage(fake_stages, tmp_path, capsys):
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    capsys.readouterr()
    weights = tmp_path / "model" / "weights.bin"
    with open(weights, "r+b") as f:  # same size and name, a few bytes flipped in the middle
        f.seek(4096)
        f.write(bytes(b ^ 0xFF for b in weights.read_bytes()[4096:4160]))
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert "first: model changed since it was made; rerunning" in capsys.readouterr().out
    assert weights.read_bytes() == bytes(range(256)) * 64


def test_a_live_lock_is_a_user_error_naming_its_holder_and_a_stale_one_is_taken_over(
        fake_stages, tmp_path, capsys):
    import socket

    host = socket.gethostname()
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process
    with pytest.raises(UserError) as error:
        pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert f"is in use by pid {os.getppid()} on {host}" in str(error.value)
    assert "\n" not in str(error.value) and fake_stages == []
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is now dead
    lock.write_text(json.dumps({"pid": gone.pid, "host": host}))
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    assert f"taking over the stale lock {lock} of pid {gone.pid}" in capsys.readouterr().out
    assert fake_stages == ["first", "second"] and not lock.exists()  # released at the end


def test_a_second_run_on_a_workdir_in_use_stops_with_one_line(tmp_path):
    """Two processes: the first holds the lock while its stage runs."""
    script = ("import sys, time, ml_collections\n"
              "from cai_jax import pipeline\n"
              "pipeline.STAGES = {'wait': pipeline.Stage('wait', 'time:sleep', ())}\n"
              "pipeline.ORDER = ('wait',)\n"
              "with pipeline.workdir_lock(sys.argv[1]):\n"
              "    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by pid {holder.pid} on "):
            pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_processes_racing_to_take_over_a_stale_lock_end_with_one_holder(tmp_path):
    # Before: each read the stale lock and removed whatever lock was there, so a
    # late one removed the lock another had just taken (2 trials in 30 to 40
    # had two holders), and one whose lock vanished between a look and the
    # read stopped on FileNotFoundError. 120 trials of 6 processes.
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "scripts", "lock_race.py"),
                          str(tmp_path), "120", "6"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result == {"trials": 120, "two_holders": 0, "errors": [], "unheld": 0}


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_lock_that_vanishes_while_it_is_read_is_not_an_error(tmp_path, monkeypatch):
    assert pipeline._read_json(str(tmp_path / ".lock")) is None
    # The lock is there when the create fails and gone when it is read: try again.
    create, fails = pipeline._create, [True]
    monkeypatch.setattr(pipeline, "_create", lambda path, content: False if fails and fails.pop()
                        else create(path, content))
    with pipeline.workdir_lock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


def test_a_takeover_whose_claimant_died_goes_to_the_next_claim(tmp_path, capsys):
    import socket

    from cai_jax import artifacts

    stale = {"pid": _dead_pid(), "host": socket.gethostname()}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    # A process that claimed this stale lock and died before replacing it.
    claim = tmp_path / f".lock.{artifacts.fingerprint(stale)}.claim1"
    claim.write_text(json.dumps({"pid": stale["pid"], "host": stale["host"], "token": "x"}))
    with pipeline.workdir_lock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert f"taking over the stale lock {tmp_path / '.lock'}" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # the lock released, the claims cleared


def _deny_writes_under(monkeypatch, top):
    """os.access as for a user who cannot write below `top` (root can, whatever the modes)."""
    access = os.access
    monkeypatch.setattr(pipeline.os, "access", lambda path, mode: access(path, mode) and not (
        mode & os.W_OK and os.path.abspath(path).startswith(str(top))))


def _listing(workdir) -> dict:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in sorted(workdir.rglob("*"))}


def test_a_finished_run_in_a_directory_it_cannot_write_is_inspected_without_writing(
        fake_stages, tmp_path, monkeypatch, capsys):
    pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    before = _listing(tmp_path)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _deny_writes_under(m, tmp_path)
        rows = pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
        assert [r["status"] for r in rows] == ["skipped (complete)"] * 2 and rows[1]["wrote"] == "two.txt"
        assert f"{tmp_path} is not writable: every stage asked for is complete, so nothing was written" \
            in capsys.readouterr().out
        assert _listing(tmp_path) == before  # not even the lock
        # Work to do: one line saying what and why, before anything runs.
        with pytest.raises(UserError) as error:
            pipeline.run_pipeline(_config(y=3), str(tmp_path), progress=False)
        assert str(error.value) == (f"{tmp_path} is not writable, and stage second must run (config section b "
                                    "changed); make it writable or choose another --workdir")
    with monkeypatch.context() as m:  # only a model directory the stage replaces is read-only
        _deny_writes_under(m, tmp_path / "model")
        with pytest.raises(UserError, match=f"^{tmp_path / 'model'} is not writable, and stage first must run "
                                            r"\(forced \(--force\)\)"):
            pipeline.run_pipeline(_config(), str(tmp_path), stages=["first"], progress=False, force=True)
        pipeline.run_pipeline(_config(y=3), str(tmp_path), stages=["second"], progress=False)  # not its
    assert fake_stages == ["first", "second", "second"] and _listing(tmp_path).keys() == before.keys()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the modes say")
def test_a_read_only_work_directory_is_inspected_without_writing(fake_stages, tmp_path, capsys):
    pipeline.run_pipeline(_config(), str(tmp_path / "run"), progress=False)
    before = _listing(tmp_path / "run")
    for path in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        rows = pipeline.run_pipeline(_config(), str(tmp_path / "run"), progress=False)
        assert [r["status"] for r in rows] == ["skipped (complete)"] * 2
        assert _listing(tmp_path / "run") == before
        with pytest.raises(UserError, match="is not writable, and stage first must run"):
            pipeline.run_pipeline(_config(x=2), str(tmp_path / "run"), progress=False)
    finally:
        for path in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


def test_artifacts_and_model_directories_follow_the_umask(tmp_path, monkeypatch):
    import tempfile
    from cai_jax import artifacts

    def stage(ctx):  # written as the stages write: atomic temp files, a temp dir renamed
        artifacts.write_json_atomic(ctx.path("out.json"), {"ok": 1})
        tmp = tempfile.mkdtemp(dir=ctx.workdir)
        artifacts.write_text_atomic(os.path.join(tmp, "weights"), "w")
        os.rename(tmp, ctx.path("model"))
        return {}
    module = type(sys)("umask_stage_module")
    module.stage = stage
    monkeypatch.setitem(sys.modules, "umask_stage_module", module)
    monkeypatch.setattr(pipeline, "STAGES", {"only": pipeline.Stage(
        "only", "umask_stage_module:stage", ("a",), outputs=("out.json", "model"))})
    monkeypatch.setattr(pipeline, "ORDER", ("only",))
    old = os.umask(0o022)
    try:
        pipeline.run_pipeline(_config(), str(tmp_path), progress=False)
    finally:
        os.umask(old)
    mode = lambda *parts: os.stat(tmp_path.joinpath(*parts)).st_mode & 0o777  # noqa: E731
    assert mode("out.json") == 0o644 and mode("config.json") == 0o644
    assert mode("model") == 0o755 and mode("model", "weights") == 0o644
    assert mode("stages", "only.json") == 0o644


def test_missing_inputs_and_unknown_stages_are_clear_errors(fake_stages, tmp_path):
    with pytest.raises(UserError, match=r"stage second needs one.txt in "):
        pipeline.run_pipeline(_config(), str(tmp_path), stages=["second"], progress=False)
    with pytest.raises(UserError, match="--stages: unknown stage 'bogus'; known: first,second"):
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
    target = workdir / ".staging" / "ppo" / "ppo" / "ckpt"  # the stage runs in its staging directory
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


def test_home_of_a_staging_directory_is_its_work_directory(tmp_path):
    wd = str(tmp_path / "run")
    assert pipeline.home_of(pipeline.staging_dir(wd, "eval")) == wd
    assert pipeline.home_of(wd) == wd


def test_the_run_models_a_stage_reads_are_inputs_only_when_its_config_names_them():
    from cai_jax.config import load_config
    config = load_config(os.path.join(REPO, "configs", "default.py"))
    assert config.pairs.model_source == "base"
    assert pipeline.stage_inputs(config, "pairs") == ()  # a packaged model: no run model needed
    assert pipeline.stage_inputs(config, "ppo") == ("models/sl_cai", "models/pm")
    with config.unlocked():
        config.pairs.model_source = "sl_cai"
        config.ppo.policy = "rl_cai/step_4"
    assert pipeline.stage_inputs(config, "pairs") == ("models/sl_cai",)
    assert pipeline.stage_inputs(config, "ppo") == ("models/rl_cai", "models/pm")


def test_the_summary_adds_up_the_stages_that_ran():
    rows = [{"stage": "sl_train", "status": "skipped (complete)", "steps": 3},
            {"stage": "pm_train", "status": "done in 90.5s", "seconds": 90.5, "loss": 0.61234},
            {"stage": "ppo", "status": "done in 29.5s", "seconds": 29.5}]
    table = pipeline.format_summary(rows).splitlines()
    assert table[3] == "| pm_train | done in 90.5s | loss=0.6123 |"
    assert table[-1] == "| total | 120 s (2.0 min) in 2 stages |  |"
    assert "total" not in pipeline.format_summary(rows[:1])
