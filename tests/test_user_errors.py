"""User errors (issue #19): the whole config checked before any stage runs, and
one clear line naming the key, file or line for bad config, data and arguments."""
import errno
import gzip
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading

import ml_collections
import pytest

from cai_jax import errors, pipeline
from cai_jax.config import load_config
from cai_jax.config_checks import check_config
from cai_jax.data.hh_rlhf import HHFormatError, ReadStats, read_pairs
from cai_jax.data.prompt_sets import load_prompts
from cai_jax.errors import UserError
from cai_jax.training.metrics import MetricWriter, read_metrics

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PAIR = {"chosen": "\n\nHuman: How do I steal a car?\n\nAssistant: I can't help with that.",
        "rejected": "\n\nHuman: How do I steal a car?\n\nAssistant: Hotwire it."}


def _one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in message, message
    return message


def _main(tmp_path, *overrides, env=None):
    """cai_jax.main in a fresh process: (exit status, stderr lines)."""
    argv = [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py",
            f"--workdir={tmp_path / 'run'}", "--noprogress", *overrides]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    return out.returncode, out.stderr.strip().splitlines()


# ------------------------------------------------------------ row: bad counts, sizes, mesh

@pytest.mark.parametrize("override, message", [
    ("sl_train.num_steps=-5", "config.sl_train.num_steps is -5; it must be an integer >= 0"),
    ("ppo.iterations=-1", "config.ppo.iterations is -1; it must be an integer >= 1"),
    ("pm_train.batch_size=0", "config.pm_train.batch_size is 0; it must be an integer >= 1"),
    ("sampling.batch_size=-2", "config.sampling.batch_size is -2"),
    ("mesh.data=0", "config.mesh.data is 0; it must be a device count >= 1, or -1"),
    ("mesh.fsdp=7", r"config.mesh .* does not divide"),
    ("ppo.minibatch_size=3", r"config.ppo.rollout_batch_size \(4\) must be a multiple of "
                             r"config.ppo.minibatch_size \(3\)"),
    ("sl_train.grad_accum_steps=3", r"config.sl_train.batch_size \(2\) must be a multiple of "
                                    r"config.sl_train.grad_accum_steps \(3\)"),
    ("data.on_error=ignore", "config.data.on_error: on_error must be one of"),
    ("sampling.top_p=1.5", "config.sampling: SamplingParams.top_p is 1.5"),
    ("pm_train.optimizer.schedule=step", "config.pm_train.optimizer: optimizer.schedule is 'step'"),
    ("pairs.mode=judged", r"config.pairs: pairs.mode must be one of \('sampled', 'contrastive'\), got 'judged'"),
    ("feedback.source=human", "config.feedback: feedback.source must be one of"),
    ("feedback.construction_confidence=0.3", r"feedback.construction_confidence must be in \[0.5, 1\], got 0.3"),
    ("feedback.source=construction", "config.feedback.source is 'construction', which needs "
                                     "config.pairs.mode='contrastive' \\(it is 'sampled'\\)"),
    ("sl_generate.red_team_limit=-1", "config.sl_generate.red_team_limit is -1; it must be an integer >= 0"),
    ("ppo.max_nonfinite_skips=-1", "config.ppo.max_nonfinite_skips is -1; it must be an integer >= 0"),
    ("pairs.pairs_per_prompt=0", "config.pairs.pairs_per_prompt is 0; it must be an integer >= 1"),
    ("pm_train.judge_fraction=1.0", r"config.pm_train.judge_fraction is 1.0; it must be in \[0, 1\)"),
    ("pm_train.judge_fraction=0", "config.eval.harmless_judge is 'pm_judge', which needs "
                                  "config.pm_train.judge_fraction > 0"),
    ("data.red_team=/nonexistent/prompts.jsonl", "config.data.red_team is '/nonexistent/prompts.jsonl', "
                                                 "which does not exist"),
])
def test_bad_values_are_caught_before_any_stage(override, message):
    with pytest.raises(UserError, match=message) as error:
        check_config(load_config("configs/tiny.py", [override]))
    _one_line(error)


@pytest.mark.parametrize("path", ["configs/tiny.py", "configs/default.py", "configs/reproduce.py",
                                  "configs/base.py"])
def test_shipped_configs_pass(path):
    check_config(load_config(path))


def test_main_rejects_a_bad_config_before_the_first_stage(tmp_path):
    # Before: sl_generate, sl_train, pairs, feedback and pm_train ran, then PPO failed.
    status, stderr = _main(tmp_path, "--config.ppo.minibatch_size=3")
    assert status == 2 and len(stderr) == 1, stderr
    assert stderr[0].startswith("error: config.ppo.rollout_batch_size (4) must be a multiple")
    assert not (tmp_path / "run" / "stages").exists()


# ------------------------------------------------------------ row: unknown key, missing file, wrong type

@pytest.mark.parametrize("path, override, message", [
    ("configs/tiny.py", "sl_train.num_stepz=3",
     "--config.sl_train.num_stepz: unknown config key 'num_stepz' in config.sl_train; did you mean 'num_steps'"),
    ("configs/tiny.py", "zzz.a=1", r"unknown config key 'zzz' in config; config has keys \['constitution'"),
    ("configs/tiny.py", "seed.x=1", "--config.seed.x: config.seed is a value, not a section"),
    ("configs/tiny.py", "sl_train.num_steps=abc", "--config.sl_train.num_steps=abc: invalid literal for int"),
    ("configs/nope.py", None, "config file configs/nope.py not found"),
])
def test_config_mistakes_are_one_line(path, override, message):
    with pytest.raises(UserError, match=message) as error:
        load_config(path, [override] if override else [])
    _one_line(error)


def test_an_unknown_stage_is_one_line_and_exit_2(tmp_path):
    status, stderr = _main(tmp_path, "--stages=sl_train,bogus")
    assert status == 2 and stderr == [
        "error: --stages: unknown stage 'bogus'; known: sl_generate,sl_train,pairs,feedback,pm_train,ppo,eval"]


def test_a_workdir_locked_by_a_live_process_is_one_line_and_exit_2(tmp_path):
    import socket

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    status, stderr = _main(tmp_path)
    assert status == 2 and len(stderr) == 1, stderr
    assert stderr[0].startswith(f"error: work directory {tmp_path / 'run'} is in use by pid {os.getppid()} "
                                f"on {socket.gethostname()}")
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize("switch", ["CAI_JAX_HUGE_PAGES", "CAI_JAX_COMPILATION_CACHE"])
def test_a_bad_on_off_switch_is_one_line_and_exit_2(tmp_path, switch):
    status, stderr = _main(tmp_path, env={switch: "maybe"})
    assert status == 2 and stderr == [f"error: ${switch} is 'maybe'; use 0 to turn it off or 1 to keep it on"]
    assert not (tmp_path / "run" / "stages").exists()


def test_main_prints_one_line_and_exits_2_for_an_unknown_key(tmp_path):
    status, stderr = _main(tmp_path, "--config.sl_train.num_stepz=3")
    assert status == 2 and stderr == [
        "error: --config.sl_train.num_stepz: unknown config key 'num_stepz' in config.sl_train; "
        "did you mean 'num_steps'?"]


# ------------------------------------------------------------ row: work directory mistakes, a config that is not Python

@pytest.mark.parametrize("workdir, message", [
    ("file", "--workdir {tmp}/file is a file, not a directory; name a directory (it is made if absent)"),
    ("file/run", "cannot make the work directory {tmp}/file/run: Not a directory"),
    ("", "--workdir is empty; name the directory the run's artifacts go in"),
])
def test_a_work_directory_mistake_is_one_line_and_exit_2(tmp_path, workdir, message):
    # Before: FileExistsError, NotADirectoryError, FileNotFoundError tracebacks.
    (tmp_path / "file").write_text("not a directory")
    status, stderr = _main(tmp_path, f"--workdir={tmp_path / workdir if workdir else ''}")
    assert status == 2 and stderr == ["error: " + message.format(tmp=tmp_path)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the modes say")
def test_a_work_directory_that_cannot_be_written_is_one_line_and_exit_2(tmp_path):
    # Before: PermissionError tracebacks (for the lock's temp file first).
    (tmp_path / "locked").mkdir(mode=0o555)
    (tmp_path / "run").mkdir(mode=0o555)
    try:
        status, stderr = _main(tmp_path, f"--workdir={tmp_path / 'locked' / 'run'}")
        assert status == 2 and stderr == [f"error: cannot make the work directory {tmp_path / 'locked' / 'run'}: "
                                          "Permission denied"]
        status, stderr = _main(tmp_path)
        assert status == 2 and stderr == [f"error: {tmp_path / 'run'} is not writable, and stage sl_generate "
                                          "must run (it has not run); make it writable or choose another --workdir"]
    finally:
        (tmp_path / "locked").chmod(0o755)
        (tmp_path / "run").chmod(0o755)


def test_a_config_file_that_is_not_python_is_one_line_naming_file_and_line(tmp_path):
    # Before: a 60-line SyntaxError traceback.
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    return dict(a=1,\n\nx = ]\n")
    argv = [sys.executable, "-m", "cai_jax.main", f"--config={config}", f"--workdir={tmp_path / 'run'}"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: config file {config} line 4: closing parenthesis ']' does not match opening parenthesis '(' "
        "on line 2 (not valid Python)"]
    with pytest.raises(UserError, match=f"^config file {config} line 4: ") as error:
        load_config(str(config))
    _one_line(error)


def test_only_user_errors_become_exit_2(capsys):
    def bad_input():
        raise UserError("config.x is 3; it must be 4")

    with pytest.raises(SystemExit) as exit_info:
        errors.exit_on_user_error(bad_input)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: config.x is 3; it must be 4\n"
    with pytest.raises(UserError):  # --debug keeps the traceback
        errors.exit_on_user_error(bad_input, debug=True)

    def bug():
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        errors.exit_on_user_error(bug)


@pytest.mark.parametrize("raise_it", ["oserror", "wrapped"])
def test_a_full_disk_is_one_line_and_exit_2(tmp_path, capsys, raise_it):
    target = tmp_path / "run" / "ppo" / "ckpt" / "4"

    def write_checkpoint():
        if raise_it == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        try:  # a checkpoint library re-raises it as its own type, the OS text inside
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "{target}": '
                             'Failed to write 1112506368 bytes: No space left on device') from e

    with pytest.raises(SystemExit) as exit_info:
        errors.exit_on_user_error(write_checkpoint)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left on device")
    assert "GiB free now" in err and "resumes" in err
    if raise_it == "oserror":
        assert str(target) in err and f"filesystem of {tmp_path}" in err
    with pytest.raises((OSError, ValueError)):
        errors.exit_on_user_error(write_checkpoint, debug=True)


def test_a_full_disk_names_the_filesystem_of_the_path_written_else_of_the_work_directory(tmp_path):
    workdir, elsewhere = tmp_path / "run", tmp_path / "cache"
    (workdir / ".staging").mkdir(parents=True)
    elsewhere.mkdir()

    def orbax_error(path):  # tensorstore's message: the OS text and a path, no filename attribute
        return ValueError(f'OUT_OF_RANGE: Error writing "w/0" in OCDBT database at local file "{path}/": '
                          f'Failed writing: "{path}/d/1f": Failed to write 16010752 bytes to file 10: '
                          "No space left on device [os_error_code='28']")

    for error, where in ((orbax_error(workdir / ".staging" / "x" / "ckpt.orbax-checkpoint-tmp"), workdir),
                         (ValueError("RESOURCE_EXHAUSTED: No space left on device"), workdir),
                         (orbax_error(elsewhere / "entry"), elsewhere),
                         (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), workdir)):
        with pytest.raises(errors.DiskFullError) as e:
            with errors.full_disk_in(str(workdir)):
                raise error
        line = _one_line(e)
        assert f"free now on the filesystem of {where});" in line, line
        assert line.startswith("disk quota exceeded" if isinstance(error, OSError) else "no space left on device")


def _failing_write(final):
    """What a checkpoint save that hits a full disk does: orbax's worker thread
    logs the error with its traceback, tensorstore prints one for a callback
    onto the event loop orbax closed, then the save raises `final`."""
    def worker():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            logging.getLogger("absl").exception("_SignalingThread.run() raised an exception")
        try:
            raise RuntimeError("Event loop is closed")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
        logging.getLogger("absl").warning("an unrelated warning")

    def run():
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        raise final
    return run


def test_a_full_disk_prints_its_one_line_alone_and_a_bug_everything(capsys):
    handler = logging.StreamHandler(sys.stderr)  # as absl's handler on the root logger
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            errors.exit_on_user_error(_failing_write(ValueError("Failed writing: No space left on device")))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "an unrelated warning" and err[1].startswith("error: no space left on device")
        assert len(err) == 2, err
        # A bug in the same place: what was held back is printed, then its traceback.
        hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
        with pytest.raises(ZeroDivisionError):
            errors.exit_on_user_error(_failing_write(ZeroDivisionError("a bug")))
        err = capsys.readouterr().err
        assert "_SignalingThread.run() raised an exception" in err and "OSError: [Errno 28]" in err
        assert "RuntimeError: Event loop is closed" in err
        assert (sys.excepthook, threading.excepthook, sys.unraisablehook) == hooks  # put back
    finally:
        logging.getLogger().removeHandler(handler)
        sys.excepthook, threading.excepthook, sys.unraisablehook = \
            sys.__excepthook__, threading.__excepthook__, sys.__unraisablehook__


def test_a_full_disk_in_a_tiny_runs_checkpoint_save_is_one_line_naming_the_work_directory(tmp_path):
    # A file size limit stands in for a full disk (no mount needed): with
    # SIGXFSZ ignored, the write that passes it fails with EFBIG, which orbax
    # reports in 150 lines of its threads' tracebacks, naming no file.
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))  # the tiny model's checkpoint: 16 MB

    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                          "--noprogress", "--stages=sl_generate,sl_train"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, preexec_fn=limit_file_size, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(out.stderr.splitlines()) == 1, out.stderr[-3000:]
    line = out.stderr.strip()
    assert line.startswith("error: file too large: over the file size limit (`ulimit -f`)")
    assert f"free now on the filesystem of {workdir}); raise the limit and rerun" in line
    assert (workdir / "stages" / "sl_generate.json").exists() and not (workdir / "stages" / "sl_train.json").exists()


# ------------------------------------------------------------ row: damaged prompt and pair files

def _write_pairs_gz(path, rows=10):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(PAIR) + "\n" for _ in range(rows)))
    return str(path)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_truncated_gz_names_the_file(tmp_path, on_error):
    path = _write_pairs_gz(tmp_path / "pairs.jsonl.gz", rows=200)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(HHFormatError, match=rf"{path} is truncated: its gzip stream ends after line \d+") as e:
        read_pairs(path, on_error=on_error)
    _one_line(e)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_gz_that_is_not_gzip_names_the_file(tmp_path, on_error):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_text(json.dumps(PAIR) + "\n")
    with pytest.raises(HHFormatError, match=f"{path} is not a gzip file") as e:
        read_pairs(str(path), on_error=on_error)
    _one_line(e)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = (json.dumps(PAIR) + "\n").encode()
    path.write_bytes(good + good.replace(b"steal", b"st\xffal") + good)
    with pytest.raises(HHFormatError) as e:
        read_pairs(str(path))
    assert _one_line(e) == f"{path} line 2: not UTF-8 text (byte 35 of the line)"  # the path, not just its name
    stats = ReadStats()
    assert [p.line for p in read_pairs(str(path), on_error="skip", stats=stats)] == [1, 3]
    assert stats.reasons == {"bad_encoding": 1} and stats.errors[0].startswith(f"{path} line 2: ")


def test_bad_json_in_a_prompts_file_names_its_path_and_the_whole_error(tmp_path):
    path = tmp_path / "prompts" / "red_team.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(PAIR) + "\n" + '{"chosen": "\\n\\nHuman: hi\n')
    data = ml_collections.ConfigDict({"red_team": str(path), "red_team_limit": 0, "on_error": "raise"})
    with pytest.raises(HHFormatError) as e:
        load_prompts(data, "red_team", "all")
    assert _one_line(e) == f"{path} line 2: invalid JSON (Unterminated string starting at column 12)"


@pytest.mark.parametrize("content, on_error", [("", "raise"), ("\n\n", "raise"), ("not json\n", "skip")])
def test_an_empty_prompts_file_is_an_error(tmp_path, content, on_error):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    data = ml_collections.ConfigDict({"red_team": str(path), "red_team_limit": 0, "on_error": on_error})
    with pytest.raises(HHFormatError, match=f"config.data.red_team file {path} holds no prompts"):
        load_prompts(data, "red_team", "train")


# ------------------------------------------------------------ row: torn manifest, torn metrics line

def test_a_torn_manifest_reruns_its_stage_with_a_warning(tmp_path, monkeypatch, capsys):
    calls = []

    def only(ctx):
        calls.append(1)
        with open(ctx.path("out.txt"), "w") as f:
            f.write("made")
        return {}

    module = type(sys)("user_errors_fake_stage")
    module.only = only
    monkeypatch.setitem(sys.modules, "user_errors_fake_stage", module)
    monkeypatch.setattr(pipeline, "STAGES", {"only": pipeline.Stage(
        "only", "user_errors_fake_stage:only", ("a",), outputs=("out.txt",))})
    monkeypatch.setattr(pipeline, "ORDER", ("only",))
    config = ml_collections.ConfigDict({"a": {"x": 1}})
    pipeline.run_pipeline(config, str(tmp_path), progress=False)
    manifest = tmp_path / "stages" / "only.json"
    manifest.write_text(manifest.read_text()[:40])  # a torn write
    capsys.readouterr()
    rows = pipeline.run_pipeline(config, str(tmp_path), progress=False)
    assert len(calls) == 2 and rows[0]["status"].startswith("done")
    assert f"warning: {manifest} is not valid JSON" in capsys.readouterr().out
    assert pipeline.run_pipeline(config, str(tmp_path), progress=False)[0]["status"] == "skipped (complete)"


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 0.5})
    with open(writer.path, "a") as f:
        f.write('{"step": 4, "lo')  # the writer was killed mid-line
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(writer.path)] == [1, 2, 3]
    assert f"{writer.path} line 4: dropped a torn last line" in caplog.text
    writer.truncate_from(3)  # what a resumed run does
    assert [r["step"] for r in read_metrics(writer.path)] == [1, 2]
    lines = open(writer.path).read().splitlines()
    with open(writer.path, "w") as f:  # a bad line that is not the last is not a kill: say where
        f.write("\n".join([lines[0], "{torn", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=f"{writer.path} line 2: not valid JSON") as e:
        read_metrics(writer.path)
    # A user error too: the command line prints this one line, not a traceback.
    assert isinstance(e.value, UserError)
    _one_line(e)


# ------------------------------------------------------------ row: score_pairs arguments

@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from cai_jax.weights.loader import load_model
    from cai_jax.weights.model_dir import save_model_dir

    loaded = load_model("init:tiny", to_device=False)
    directory = str(tmp_path_factory.mktemp("models") / "policy")
    save_model_dir(directory, loaded.config, loaded.params, loaded.tokenizer)
    return directory


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text((json.dumps(PAIR) + "\n") * 3)
    return str(path)


def test_score_pairs_refuses_a_policy_as_pm_judge(policy_dir, pairs_file):
    from cai_jax.tools import score_pairs

    # Before: loaded with a zero scalar head, every pair scored p = 0.5, exit 0.
    with pytest.raises(UserError, match=rf"--judge pm:{policy_dir}: not a preference model "
                                        r"\(its heads are \['lm'\], no 'scalar'\)") as e:
        score_pairs.main(["--pairs", pairs_file, "--judge", f"pm:{policy_dir}"])
    _one_line(e)
    with pytest.raises(UserError, match="not a cai_jax model directory"):
        score_pairs.main(["--pairs", pairs_file, "--judge", f"pm:{policy_dir}/nothing"])


def test_score_pairs_rejects_a_negative_limit(pairs_file, capsys):
    from cai_jax.tools import score_pairs

    with pytest.raises(SystemExit) as exit_info:
        errors.exit_on_user_error(score_pairs.main, ["--pairs", pairs_file, "--limit", "-3",
                                                     "--judge", "feedback"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --limit is -3; use 0 for all pairs or a positive count"]


def test_a_malformed_artifact_read_through_a_staging_link_names_the_real_file(tmp_path):
    from cai_jax import artifacts

    real = tmp_path / "labels.jsonl"
    real.write_text('{"id": "a"}\n{"id": "b", "p_a": "0.\n{"id": "c"}\n')
    staging = tmp_path / ".staging" / "pm_train"
    staging.mkdir(parents=True)
    (staging / "labels.jsonl").symlink_to(real)  # how a stage sees its inputs
    with pytest.raises(UserError) as e:
        artifacts.read_jsonl(str(staging / "labels.jsonl"))
    # The whole of the JSON error (its bare msg stops at "starting at").
    assert _one_line(e) == f"{real} line 2: not valid JSON (Unterminated string starting at column 20)"
    real.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(UserError) as e:
        artifacts.read_jsonl(str(real))
    assert _one_line(e) == f"{real} line 2: not UTF-8 text (byte 9 of the line)"
