"""Scaling plots over the runs of a sweep (the paper's figures 3 and 4).

    python experiments/aggregate.py --workdir_root runs/sweep [--out runs/sweep/aggregate]

Reads every run directory under the root (one holding `config.json`):
its model size from the config, its Elo scores from `eval/elo.json`, and
the accuracies its preference-model and feedback stages reported in their
manifests (`stages/pm_train.json`, `stages/feedback.json`: every numeric
summary value whose key contains "acc"). Writes `aggregate.json`,
`aggregate.md`, `elo_vs_params.png` and `accuracy_vs_params.png`.

Each run's Elo is anchored at its own base model, so a point shows how far
SL-CAI / RL-CAI moved from the helpful model of that size, not an absolute
scale shared across sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from cai_jax import artifacts
from cai_jax.eval import plots
from cai_jax.eval.report import error_bounds
from cai_jax.models.config import model_config_from_dict

ACCURACY_STAGES = ("pm_train", "feedback")


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def find_runs(root: str) -> list[str]:
    """Run directories (holding config.json) one or two levels below root, sorted."""
    def is_run(path):
        return os.path.exists(os.path.join(path, "config.json"))

    def subdirs(path):
        return [os.path.join(path, d) for d in sorted(os.listdir(path))
                if os.path.isdir(os.path.join(path, d))]

    runs = []
    for child in subdirs(root):
        runs += [child] if is_run(child) else [g for g in subdirs(child) if is_run(g)]
    return runs


def n_params(config: dict) -> int:
    """Parameter count of the run's base model, from its config's model section."""
    model = {k: v for k, v in config.get("model", {}).items() if v is not None}
    return model_config_from_dict(model).num_params()


def elo_points(run: dict, elo: dict) -> list[dict]:
    """One point per method: the helpful model, SL-CAI and each RL method's last checkpoint."""
    dims = elo.get("dimensions", {})
    chosen: dict[str, dict] = {}
    for model in elo.get("models", []):
        method = model.get("method", model["name"])
        if model.get("step") is not None:
            best = chosen.get(method)
            if best is not None and best["step"] >= model["step"]:
                continue
        chosen[method] = model
    points = []
    for method, model in chosen.items():
        p = {"method": method, "n_params": run["n_params"], "run": run["name"], "model": model["name"]}
        for dim, section in dims.items():
            if model["name"] in section["elo"]:
                p[f"{dim}_elo"] = section["elo"][model["name"]]
                bounds = error_bounds(section, model["name"])
                if bounds is not None:
                    p[f"{dim}_lo"], p[f"{dim}_hi"] = bounds
        if any(k.endswith("_elo") for k in p):
            points.append(p)
    return points


def accuracy_points(run: dict, run_dir: str) -> list[dict]:
    points = []
    for stage in ACCURACY_STAGES:
        manifest = _read_json(os.path.join(run_dir, "stages", f"{stage}.json")) or {}
        for key, value in sorted(manifest.get("summary", {}).items()):
            if "acc" in key and isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
                points.append({"method": f"{stage}: {key}", "n_params": run["n_params"],
                               "accuracy": float(value), "run": run["name"]})
    return points


def _drop_partial_bounds(points: list[dict], keys: Sequence[str]) -> list[dict]:
    """The plots draw error bars for a method only if all its points have them."""
    for method in {p["method"] for p in points}:
        group = [p for p in points if p["method"] == method]
        for key in keys:
            if not all(f"{key}_lo" in p for p in group):
                for p in group:
                    p.pop(f"{key}_lo", None), p.pop(f"{key}_hi", None)
    return points


def aggregate(root: str, out: str) -> dict:
    runs, elo_pts, acc_pts = [], [], []
    for run_dir in find_runs(root):
        config = _read_json(os.path.join(run_dir, "config.json"))
        run = {"name": os.path.relpath(run_dir, root), "model": config.get("model", {}).get("name"),
               "n_params": n_params(config)}
        elo = _read_json(os.path.join(run_dir, "eval", "elo.json"))
        run["has_elo"] = elo is not None
        if elo is not None:
            elo_pts += elo_points(run, elo)
        acc_pts += accuracy_points(run, run_dir)
        runs.append(run)
    if not runs:
        raise SystemExit(f"no run directories (with config.json) under {root}")
    os.makedirs(out, exist_ok=True)
    figures = {}
    if elo_pts:
        figures["elo_vs_params"] = plots.plot_elo_vs_params(
            _drop_partial_bounds(elo_pts, ("helpful", "harmless")), os.path.join(out, "elo_vs_params.png"),
            title="Elo vs model size (each run anchored at its base model)")
    if acc_pts:
        figures["accuracy_vs_params"] = plots.plot_accuracy_vs_params(
            _drop_partial_bounds(acc_pts, ("accuracy",)), os.path.join(out, "accuracy_vs_params.png"))
    result = {"runs": runs, "elo_points": elo_pts, "accuracy_points": acc_pts,
              "figures": {k: os.path.basename(v) for k, v in figures.items()}}
    artifacts.write_json_atomic(os.path.join(out, "aggregate.json"), result)
    artifacts.write_text_atomic(os.path.join(out, "aggregate.md"), to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    def fmt(p, dim):
        if f"{dim}_elo" not in p:
            return ""
        ci = f" [{p[f'{dim}_lo']:.0f}, {p[f'{dim}_hi']:.0f}]" if f"{dim}_lo" in p else ""
        return f"{p[f'{dim}_elo']:.0f}{ci}"

    lines = ["# Sweep results", "",
             "Elo is relative to each run's own base model (= 0), with bootstrap intervals.", "",
             "| run | params | method | harmless Elo | helpful Elo |", "|---|---:|---|---:|---:|"]
    for p in result["elo_points"]:
        lines.append(f"| {p['run']} | {p['n_params']:.3g} | {p['method']} | {fmt(p, 'harmless')} | "
                     f"{fmt(p, 'helpful')} |")
    lines += ["", "| run | params | accuracy | value |", "|---|---:|---|---:|"]
    for p in result["accuracy_points"]:
        lines.append(f"| {p['run']} | {p['n_params']:.3g} | {p['method']} | {p['accuracy']:.3f} |")
    missing = [r["name"] for r in result["runs"] if not r["has_elo"]]
    if missing:
        lines += ["", f"Runs without eval/elo.json (eval not run yet): {', '.join(missing)}."]
    for name, file in result["figures"].items():
        lines += ["", f"![{name}]({file})"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir_root", required=True, help="the sweep's --workdir_root")
    parser.add_argument("--out", default=None, help="output directory (default: <root>/aggregate)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdir_root, "aggregate")
    result = aggregate(args.workdir_root, out)
    print(to_markdown(result))
    print(f"wrote {out}/aggregate.json, aggregate.md and {len(result['figures'])} figure(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
