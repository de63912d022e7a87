"""A grid of pipeline runs that differ in a few config fields.

    python experiments/sweep.py --config configs/default.py \\
        --sweep model.name=810m,1.6b,3.5b --set pm_train.steps=100 \\
        --workdir_root runs/sweep [--mode local|tpu] [--dry_run]

Every `--sweep KEY=V1,V2,...` adds a dimension (several make a Cartesian
product); `--set KEY=VALUE` applies to every run. Each run gets its own work
directory `<workdir_root>/<name>`, its name made from the swept values
(e.g. `model.name-810m`), and is an ordinary `python -m cai_jax.main` with
`--config.KEY=VALUE` overrides, so a finished run is skipped and a killed one
resumes when the sweep is started again.

`--mode local` runs them one after another here; `--mode tpu` launches each
on a TPU VM through experiments/tpu_launch.py (same VM, one after another;
`--vm_per_run` gives each run its own VM, started in the background).
Overrides are checked against the config before anything starts.
`experiments/aggregate.py --workdir_root ...` then draws the scaling plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shlex
import subprocess
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_launch  # noqa: E402  (a sibling script, not a package)


@dataclasses.dataclass(frozen=True)
class SweepRun:
    name: str
    workdir: str
    overrides: tuple[str, ...]  # "key=value", without the --config. prefix


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"{flag} {text!r}: expected KEY=VALUE, e.g. model.name=810m")
    return key.strip(), value


def run_name(assignments: Sequence[tuple[str, str]]) -> str:
    """A directory-safe name from the swept values: model.name-810m_seed-1."""
    parts = [f"{k}-{v}" for k, v in assignments] or ["run"]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))


def expand(sweeps: Sequence[str], sets: Sequence[str], workdir_root: str) -> list[SweepRun]:
    """Runs of the grid, in the order the values were given (first --sweep slowest)."""
    dims = []
    for text in sweeps:
        key, values = parse_assignment(text, "--sweep")
        dims.append([(key, v) for v in values.split(",") if v])
    fixed = [parse_assignment(text, "--set") for text in sets]
    swept = [k for k, _ in (d[0] for d in dims)]
    clash = sorted({k for k, _ in fixed} & set(swept)) + sorted({k for k in swept if swept.count(k) > 1})
    if clash:
        raise ValueError(f"{clash}: a key may be swept once, and not both swept and --set")
    runs = []
    for combo in itertools.product(*dims):
        name = run_name(combo)
        overrides = tuple(f"{k}={v}" for k, v in list(combo) + fixed)
        runs.append(SweepRun(name, os.path.join(workdir_root, name), overrides))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs would share a work directory: {names}")
    return runs


def validate(config_path: str, runs: Sequence[SweepRun]) -> None:
    """Loads each run's config so that a typo fails now, not hours in."""
    from cai_jax.config import load_config
    for run in runs:
        try:
            load_config(config_path, run.overrides)
        except (Exception, SystemExit) as e:  # absl flag errors, unknown keys, bad values
            what = "no such field" if isinstance(e, KeyError) else type(e).__name__
            raise SystemExit(f"run {run.name}: {config_path} rejects the overrides "
                             f"{list(run.overrides)} ({what}: {e})") from e


def local_command(config_path: str, run: SweepRun, stages: Optional[str] = None,
                  python: str = sys.executable) -> list[str]:
    argv = [python, "-m", "cai_jax.main", f"--config={config_path}", f"--workdir={run.workdir}"]
    argv += [f"--config.{o}" for o in run.overrides]
    if stages:
        argv.append(f"--stages={stages}")
    return argv


def run_local(config_path: str, runs: Sequence[SweepRun], stages: Optional[str], dry_run: bool) -> int:
    failed = []
    for i, run in enumerate(runs, 1):
        argv = local_command(config_path, run, stages)
        print(f"# [{i}/{len(runs)}] {run.name}" if dry_run else f"== [{i}/{len(runs)}] {run.name}")
        print(shlex.join(argv), flush=True)
        if dry_run:
            continue
        if subprocess.run(argv, check=False).returncode != 0:
            failed.append(run.name)
    if failed:
        print(f"failed runs: {failed} (rerun the sweep to resume them)", file=sys.stderr)
    return 1 if failed else 0


def tpu_plans(args, runs: Sequence[SweepRun]) -> list[list[tpu_launch.Step]]:
    """One launch plan per run. On a shared VM the code is installed once and the
    runs wait for each other; with --vm_per_run each gets a VM and runs detached."""
    plans = []
    for i, run in enumerate(runs):
        vm = tpu_launch.vm_from_args(args, f"{args.tpu_name}-{i}" if args.vm_per_run else None)
        plans.append(tpu_launch.plan_launch(
            vm, config=args.config, workdir=run.workdir, overrides=run.overrides, stages=args.stages,
            source=args.source, repo_url=args.repo_url, revision=args.revision,
            install=not args.skip_install and (args.vm_per_run or i == 0),
            detach=args.detach or args.vm_per_run, run_name=run.name))
    return plans


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="a swept field and its values (repeatable: Cartesian product)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a field set the same way in every run (repeatable)")
    parser.add_argument("--workdir_root", required=True, help="each run writes to <root>/<run name>")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages")
    parser.add_argument("--mode", choices=("local", "tpu"), default="local")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--no_validate", action="store_true",
                        help="skip loading the config (e.g. configs only the TPU checkout has)")
    parser.add_argument("--vm_per_run", action="store_true",
                        help="--mode=tpu: one TPU VM per run (named <tpu_name>-<i>), started in parallel")
    tpu_launch.add_vm_arguments(parser, required=False)  # checked below, in tpu mode only
    args = parser.parse_args(argv)

    try:
        runs = expand(args.sweep, args.set, args.workdir_root)
    except ValueError as e:
        parser.error(str(e))
    if not args.no_validate:
        validate(args.config, runs)
    if args.mode == "local":
        return run_local(args.config, runs, args.stages, args.dry_run)
    missing = [f"--{k}" for k in ("tpu_name", "zone") if not getattr(args, k)]
    if missing:
        parser.error(f"--mode=tpu needs {missing}")
    for run, plan in zip(runs, tpu_plans(args, runs)):
        print(f"# ===== {run.name}")
        if args.dry_run:
            print(tpu_launch.format_plan(plan), flush=True)
        else:
            tpu_launch.execute_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
