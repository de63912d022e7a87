"""The labels bench: which source of AI labels gives a preference model that
agrees with people, measured on HH-RLHF harmless-base test pairs no stage used.

    python benchmarks/bench_labels.py                     # SmolLM2 and Qwen 0.5B judges
    python benchmarks/bench_labels.py --labelers smollm2,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct

Cells (each saved to --out/results.json as it finishes; a rerun skips what is
there, so a killed bench resumes):

* baselines: the trivial judges of cai_jax/eval/answer_rules.py on the first
  --limit HH pairs (ties count one half).
* direct/<source>/<labeler>: the labeler judging HH pairs itself, for each
  judging source in --sources (multiple_choice: both answers in one prompt;
  pointwise: each answer alone), with configs/default.py's feedback settings,
  on the first --judge_limit HH pairs: agreement with the human label, option
  mass, seconds per label.
* pm/construction/<generator>: the pipeline's own stages in a work directory:
  pairs (pairs.mode=contrastive, each of --generators answering --prompts red-team training
  prompts under the constitution's framings), feedback (source=construction),
  pm_train (soft Bradley-Terry, configs/default.py's settings); the PM is then
  scored on the first --limit HH pairs.
* pm/<source>/<labeler>: the first generator's pairs labelled by the labeler under each
  judging source, the same PM training and scoring; also the labels'
  agreement with the construction and their option mass.

Writes results.json, table.md and figure.png (accuracy against labeler
parameters, a line per method: the paper's figure 4 in miniature) to --out.
Intervals are 95% normal intervals over pairs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")
SHARED = os.environ.get("CAI_JAX_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
HH_TEST = os.path.join(SHARED, "hh-rlhf", "harmless-base-test.jsonl.gz")
# Parameters of the offline models, for the figure's x axis.
SOURCES = ("multiple_choice", "pointwise")  # the judging label sources (feedback.source)
PARAMETERS = {"smollm2": 135e6, "qwen2.5-coder-0.5b-instruct": 494e6, "qwen2.5-coder-1.5b-instruct": 1.54e9}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labelers", default="smollm2,qwen2.5-coder-0.5b-instruct",
                   help="comma-separated model references judging HH pairs directly")
    p.add_argument("--sources", default="multiple_choice,pointwise",
                   help="judging sources (feedback.source) each labeler is measured with")
    p.add_argument("--generators", default="qwen2.5-coder-0.5b-instruct",
                   help="comma-separated models answering under the contrastive framings (the "
                        "first one's pairs are also the ones the labelers label)")
    p.add_argument("--prompts", type=int, default=200, help="red-team training prompts made into pairs")
    p.add_argument("--prompt_source", choices=("embedded", "hh_unscored"), default="embedded",
                   help="where the contrastive pairs' red-team prompts come from: the package's own set, "
                        "or the first human turns of the HH test pairs nobody scores (see "
                        "unscored_hh_file); cells of the second carry it in their key")
    p.add_argument("--limit", type=int, default=1000, help="HH test pairs the PMs and baselines are scored on")
    p.add_argument("--judge_limit", type=int, default=100, help="HH test pairs each labeler judges directly")
    p.add_argument("--pm_labelers", default="smollm2",
                   help="labelers whose labels (each source) of the contrastive pairs train a PM ('' for none)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="experiment config whose sections are used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every cell, e.g. --set pm_train.num_epochs=3")
    p.add_argument("--pairs", default=HH_TEST, help="HH-format test pairs")
    p.add_argument("--out", default=os.path.join(HERE, "results", "labels"))
    return p.parse_args(argv)


# ------------------------------------------------------------ numbers

def accuracy_interval(p_chosen) -> dict:
    """Agreement with the human label (p > 0.5 right, a tie one half) and its
    95% normal interval over pairs."""
    p = np.asarray(p_chosen, np.float64)
    right = np.where(p == 0.5, 0.5, (p > 0.5).astype(np.float64))
    acc = float(right.mean())
    half = 1.96 * float(right.std(ddof=1)) / math.sqrt(len(right)) if len(right) > 1 else float("nan")
    return {"n": int(len(p)), "accuracy": acc, "low": acc - half, "high": acc + half}


class Results:
    """results.json: one entry per finished cell, written atomically."""

    def __init__(self, out: str):
        from cai_jax import artifacts

        self.path, self._write = os.path.join(out, "results.json"), artifacts.write_json_atomic
        self.cells = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def run(self, key: str, compute) -> dict:
        if key not in self.cells:
            print(f"== {key}", flush=True)
            start = time.time()
            cell = compute()
            cell["seconds"] = time.time() - start
            self.cells[key] = cell
            self._write(self.path, self.cells)
        print(f"{key}: {json.dumps(self.cells[key])}", flush=True)
        return self.cells[key]


def bench_config(args, *overrides: str):
    from cai_jax.config import load_config

    return load_config(args.config, [*args.set, *overrides])


# ------------------------------------------------------------ cells

def baselines(hh_pairs) -> dict:
    from cai_jax.eval.answer_rules import TRIVIAL_JUDGES

    return {name: accuracy_interval([judge(p.chosen, p.rejected) for p in hh_pairs])
            for name, judge in TRIVIAL_JUDGES.items()}


def direct(args, source: str, labeler: str, hh_pairs) -> dict:
    """The labeler judging HH pairs itself (chosen shown first; multiple choice
    asks both orders, which cancels the slot)."""
    from cai_jax.tools.score_pairs import feedback_judge, p_chosen

    judge = feedback_judge(bench_config(args, f"feedback.source={source}",
                                        f"feedback.model_source={labeler}"), progress=True)
    p = p_chosen(judge, hh_pairs)
    return {**accuracy_interval(p), "option_mass": float(np.mean(judge.option_mass)),
            "seconds_per_label": judge.seconds / len(p)}


def pm_cell(args, workdir: str, hh_pairs, *overrides: str) -> dict:
    """feedback and pm_train stages on the pairs in `workdir`, then the PM on HH pairs."""
    from cai_jax import pipeline, sharding
    from cai_jax.tools.score_pairs import p_chosen, pm_judge

    # One PM on all of the source's labels (no judge PM split off).
    config = bench_config(args, "pm_train.judge_fraction=0", "eval.harmless_judge=pm", *overrides)
    start = time.time()
    [labels] = pipeline.run_pipeline(config, workdir, ["feedback"], progress=True)
    label_seconds = time.time() - start
    [trained] = pipeline.run_pipeline(config, workdir, ["pm_train"], progress=True)
    p = p_chosen(pm_judge(os.path.join(workdir, "models", "pm"), 8, sharding.mesh_from_config(config)), hh_pairs)
    cell = {**accuracy_interval(p), "labels": labels["labels"],
            "seconds_per_label": label_seconds / max(1, labels["labels"]),
            "pm_eval_accuracy": trained.get("eval_accuracy")}
    for key in ("option_mass", "agreement_with_construction", "position_bias", "label_entropy_bits"):
        if key in labels:
            cell[key] = labels[key]
    return cell


# Lines of the HH file after the scored pairs that stay unused as a margin:
# the scored pairs are the first --limit readable ones, and skipped lines push
# the last of them past line --limit.
SCORED_MARGIN = 100


def unscored_hh_file(args, work: str) -> str:
    """The HH test pairs no cell scores, as an HH-format file in `work`: the
    lines after the first --limit + SCORED_MARGIN, less those whose first human
    turn is also the first turn of a line before them. Only their first turns
    are read (as red-team prompts); their human labels are not."""
    import gzip

    from cai_jax.data.conversation import parse_hh

    def first_turn(line: str):
        try:
            opening = parse_hh(json.loads(line)["chosen"])[0]
        except (ValueError, KeyError, TypeError):  # a malformed line excludes nothing
            return None
        return opening.content if opening.role == "user" else None

    with gzip.open(args.pairs, "rt") if args.pairs.endswith(".gz") else open(args.pairs) as f:
        lines = f.read().splitlines()
    cut = args.limit + SCORED_MARGIN
    scored = {first_turn(line) for line in lines[:cut]}
    rest = [line for line in lines[cut:] if first_turn(line) not in scored]
    path = os.path.join(work, "hh_rest.jsonl.gz")  # its name is part of the prompt ids
    if not os.path.exists(path):
        os.makedirs(work, exist_ok=True)
        with gzip.open(path + ".tmp", "wt") as f:
            f.write("\n".join(rest) + "\n")
        os.replace(path + ".tmp", path)
    return path


def on_prompts(args) -> str:
    """Added to the keys of cells whose pairs answer prompts other than the package's."""
    return "" if args.prompt_source == "embedded" else f" on {args.prompts} unscored HH prompts"


def contrastive_pairs(args, generator: str, workdir: str) -> dict:
    from cai_jax import pipeline

    source = []
    if args.prompt_source == "hh_unscored":
        source = [f"data.red_team={unscored_hh_file(args, os.path.dirname(workdir))}", "data.on_error=skip"]
    config = bench_config(args, "pairs.mode=contrastive", f"pairs.model_source={generator}",
                          "pairs.include_helpful=False", f"pairs.red_team_limit={args.prompts}",
                          f"data.red_team_limit={args.prompts}", *source)
    [row] = pipeline.run_pipeline(config, workdir, ["pairs"], progress=True)
    return {k: v for k, v in row.items() if k != "stage"}


# ------------------------------------------------------------ report

def baseline_cells(cells: dict) -> dict:
    """The trivial judges' cells (the baselines entry also holds its seconds)."""
    return {k: v for k, v in cells.get("baselines", {}).items() if isinstance(v, dict)}


def table(cells: dict, args) -> str:
    rows = ["| method | labeler | pairs | accuracy [95% interval] | option mass | agrees with construction | "
            "s / label |", "|---|---|---|---|---|---|---|"]

    def fmt(cell, key, spec=".2f"):
        return format(cell[key], spec) if cell.get(key) is not None else ""

    def row(method, who, cell):
        rows.append(f"| {method} | {who} | {cell['n']} | {cell['accuracy']:.3f} [{cell['low']:.3f}, "
                    f"{cell['high']:.3f}] | {fmt(cell, 'option_mass')} | "
                    f"{fmt(cell, 'agreement_with_construction')} | {fmt(cell, 'seconds_per_label')} |")

    for name, cell in baseline_cells(cells).items():
        row("trivial baseline", name, cell)
    for key, cell in cells.items():
        if key.startswith("direct/"):
            _, source, labeler = key.split("/", 2)
            row(f"labeler judges HH pairs directly ({source})", labeler, cell)
    for key, cell in cells.items():
        if key.startswith("pm/construction/"):
            row("PM on labels by construction (contrastive framings)", f"generator {key.split('/', 2)[2]}",
                cell)
    for key, cell in cells.items():
        if key.startswith("pm/") and not key.startswith("pm/construction/"):
            _, source, labeler = key.split("/", 2)
            row(f"PM on {source} labels of the same pairs", labeler, cell)
    return "\n".join(rows)


def figure(cells: dict, args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = [(f"direct/{source}/", f"labeler judging HH pairs directly ({source})", "o")
             for source in SOURCES] + [(f"pm/{source}/", f"PM on the labeler's {source} labels", "s")
                                       for source in SOURCES]
    for i, (prefix, label, marker) in enumerate(lines):
        points = sorted((PARAMETERS[k[len(prefix):]], c) for k, c in cells.items()
                        if k.startswith(prefix) and k[len(prefix):] in PARAMETERS)
        if points:
            xs = [x * 1.04 ** i for x, _ in points]  # nudged apart so equal points stay visible
            ax.errorbar(xs, [c["accuracy"] for _, c in points],
                        yerr=[[c["accuracy"] - c["low"] for _, c in points],
                              [c["high"] - c["accuracy"] for _, c in points]],
                        marker=marker, capsize=3, label=label)
    made = sorted((PARAMETERS[k.split("/", 2)[2]], c) for k, c in cells.items()
                  if k.startswith("pm/construction/") and k.split("/", 2)[2] in PARAMETERS)
    if made:
        ax.errorbar([x for x, _ in made], [c["accuracy"] for _, c in made],
                    yerr=[[c["accuracy"] - c["low"] for _, c in made],
                          [c["high"] - c["accuracy"] for _, c in made]], marker="*", markersize=12,
                    capsize=3, label="PM on labels by construction (x: generator parameters)")
    best = max(baseline_cells(cells).items(), key=lambda kv: kv[1]["accuracy"], default=None)
    if best:
        ax.axhline(best[1]["accuracy"], color="grey", linestyle="--", label=f"best trivial: {best[0]}")
    ax.axhline(0.5, color="black", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("labeler parameters")
    ax.set_ylabel("agreement with HH human labels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    from cai_jax.data.hh_rlhf import read_pairs

    os.makedirs(args.out, exist_ok=True)
    results = Results(args.out)
    hh = read_pairs(args.pairs, on_error="skip", limit=args.limit)
    results.run("baselines", lambda: baselines(hh))
    sources = list(filter(None, args.sources.split(",")))
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        sys.exit(f"error: --sources {unknown} unknown; choose from {list(SOURCES)}")
    for labeler in filter(None, args.labelers.split(",")):
        for source in sources:
            results.run(f"direct/{source}/{labeler}",
                        lambda: direct(args, source, labeler, hh[:args.judge_limit]))
    work = os.path.join(args.out, "work")
    generators = list(filter(None, args.generators.split(",")))
    suffix = on_prompts(args)

    def cell_dir(*parts: str) -> str:
        return os.path.join(work, *parts[:-1], (parts[-1] + suffix).replace(" ", "_"))

    for generator in generators:
        workdir = cell_dir("construction", generator)
        results.run(f"pairs/{generator}{suffix}", lambda: contrastive_pairs(args, generator, workdir))
        results.run(f"pm/construction/{generator}{suffix}",
                    lambda: pm_cell(args, workdir, hh, "feedback.source=construction"))
    made = cell_dir("construction", generators[0])
    for labeler in filter(None, args.pm_labelers.split(",")):
        for source in sources:
            workdir = cell_dir(source, labeler)
            os.makedirs(workdir, exist_ok=True)
            shutil.copyfile(os.path.join(made, "pairs.jsonl"), os.path.join(workdir, "pairs.jsonl"))
            results.run(f"pm/{source}/{labeler}{suffix}", lambda: pm_cell(
                args, workdir, hh, f"feedback.source={source}", f"feedback.model_source={labeler}"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(results.cells, args) + "\n")
    figure(results.cells, args, os.path.join(args.out, "figure.png"))
    print(table(results.cells, args))
    print(f"wrote {args.out}/table.md and figure.png", file=sys.stderr)


if __name__ == "__main__":
    main()
