"""Scores an HH-format pairs file with a judge and reports how well it agrees
with the human labels.

    python -m cai_jax.tools.score_pairs --pairs FILE [--limit N] \\
        --judge feedback|pointwise|pm:CHECKPOINT_DIR [--config configs/x.py] [--model SOURCE] [--plot out.png]
        [--set feedback.num_principles=4] [--save-scores scores.jsonl]

Judges (the evaluation's, cai_jax/eval/judges.py, with the chosen answer as
A): `feedback` is the AI-feedback labeller (multiple choice under the
constitution's harmlessness principles, both orders, as the `feedback` stage
runs it; --model replaces feedback.model_source); `pointwise` is the same
labeller judging each answer alone (feedback.source=pointwise: Yes/No under
each principle, p = sigmoid of the score difference); `pm:DIR` is a trained
preference model directory. p(chosen) is the judge's verdict, its two orders
averaged. Each judge runs on the config's mesh (`config.mesh`).

Printed: accuracy (p(chosen) > 0.5), mean p(chosen), expected calibration
error and Brier score. Calibration is measured on both orientations of every
pair (p(chosen) against outcome 1 and 1 - p(chosen) against outcome 0): a
judge only ever sees "two answers", so asking whether its probability of
"this one is better" matches how often it is is what matters. Brier score is
mean (1 - p(chosen))^2. The last output line is one JSON object with these
numbers, n and judge; for the feedback judges also the mean option mass and
the seconds of labelling per pair (over the pairs this process scored).
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from cai_jax import artifacts
from cai_jax.compile_cache import enable_compilation_cache
from cai_jax.data.hh_rlhf import ReadStats, read_pairs
from cai_jax.errors import UserError, exit_on_user_error
from cai_jax.eval import judges
from cai_jax.eval.plots import plot_reliability, reliability_bins


def judge_metrics(p_chosen: Sequence[float], n_bins: int = 10) -> dict:
    """accuracy, mean p(chosen), ECE (both orientations) and Brier score."""
    p = np.asarray(p_chosen, np.float64)
    if p.size == 0:
        raise ValueError("no pairs were scored")
    probs, outcomes = np.concatenate([p, 1.0 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)])
    _, _, _, ece = reliability_bins(probs, outcomes, n_bins)
    return {"n": int(p.size), "accuracy": float(np.mean(p > 0.5)), "mean_p_chosen": float(np.mean(p)),
            "ece": float(ece), "brier": float(np.mean((1.0 - p) ** 2))}


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "base.py")


def _set(config, assignment: str) -> None:
    """Applies "a.b=value" (value parsed as a Python literal, else kept as text)."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected KEY=VALUE")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


def load_judge_config(path: Optional[str], overrides: Sequence[str] = ()):
    """The experiment config (default configs/base.py) with the feedback
    section's defaults added when the file has none, then the overrides."""
    from cai_jax.config import load_config
    from cai_jax.rl_cai import feedback

    config = load_config(path or DEFAULT_CONFIG)
    config.unlock()
    if "feedback" not in config:
        config.feedback = feedback.get_default_config()
    for assignment in overrides:
        _set(config, assignment)
    config.lock()
    return config


def feedback_judge(config, progress: bool) -> judges.FeedbackJudge:
    """The AI feedback labeller of config.feedback as a harmlessness judge, as
    configured (both orders are asked when feedback.both_orders), on config's
    mesh. Its seconds and option masses count the pairs this process scored,
    not those a resumed run read back."""
    from cai_jax import sharding
    from cai_jax.rl_cai import feedback

    labeler = feedback.labeler_from_config(config, mesh=sharding.mesh_from_config(config))
    return judges.FeedbackJudge(labeler, "harmless", require_both_orders=False, progress=progress)


def check_preference_model(directory: str) -> None:
    """A pm judge needs a model saved with a scalar head: a policy's would get a
    zero head and score every pair p = 0.5."""
    from cai_jax.weights.model_dir import read_model_config

    try:
        heads = read_model_config(directory.removeprefix("ckpt:")).heads
    except FileNotFoundError as e:
        raise UserError(f"--judge pm:{directory}: {e}") from None
    if "scalar" not in heads:
        raise UserError(f"--judge pm:{directory}: not a preference model (its heads are {list(heads)}, "
                        "no 'scalar'); give a preference model directory such as <workdir>/models/pm")


def pm_judge(directory: str, batch_size: int, mesh) -> judges.PreferenceModelJudge:
    """The preference model in `directory` as a judge: p = sigmoid(score(A) - score(B)), on `mesh`."""
    from cai_jax.inference.preference_scorer import PreferenceScorer

    check_preference_model(directory)
    return judges.PreferenceModelJudge(PreferenceScorer.from_dir(directory, batch_size=batch_size, mesh=mesh),
                                       f"pm:{directory}")


def pair_id(pair) -> str:
    return f"{pair.source}:{pair.line}"


def p_chosen(judge: judges.Judge, pairs) -> np.ndarray:
    """p(chosen better) per HH pair: the judge's verdict on (A: chosen, B: rejected).
    Each pair is its own prompt and comparison (named by pair_id)."""
    comparisons = [judges.ModelComparison(pair_id(p), p.context, "chosen", "rejected", p.chosen,
                                          p.rejected, comparison_id=pair_id(p)) for p in pairs]
    return np.asarray([v.outcome for v in judge.judge(comparisons)], np.float64)


def score_resumably(pairs, judge, path: str, setting: str, chunk: int = 32,
                    progress: bool = False) -> np.ndarray:
    """Scores in chunks with `judge` (pairs -> p(chosen), as p_chosen), appending
    {id, line, p_chosen, setting} to `path`.partial as each chunk finishes, so
    a killed run continues where it stopped; the finished file is `path`.
    Records of another setting (judge, model, overrides) are an error rather
    than silently mixed in."""
    log = artifacts.PartialJsonl(path)
    other = [r for r in log.records if r.get("setting") != setting]
    if other:
        raise ValueError(f"{log.partial} holds scores of another setting ({other[0].get('setting')}); "
                         "delete it or pass another --save-scores file")
    done = log.done_keys()
    todo = [p for p in pairs if pair_id(p) not in done]
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="pairs", disable=not progress)
    for part in artifacts.iter_batches(todo, chunk):
        log.extend({"id": pair_id(p), "line": p.line, "p_chosen": float(x), "setting": setting}
                   for p, x in zip(part, judge(part)))
        bar.update(len(part))
    bar.close()
    records = log.finish(order=[pair_id(p) for p in pairs])
    return np.asarray([r["p_chosen"] for r in records])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="HH-format .jsonl or .jsonl.gz (chosen/rejected)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0: all)")
    parser.add_argument("--judge", required=True, help="'feedback', 'pointwise' or 'pm:CHECKPOINT_DIR'")
    parser.add_argument("--config", default=None, help="experiment config (default configs/base.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set feedback.num_principles=4 (repeatable)")
    parser.add_argument("--model", default=None, help="feedback model source (replaces feedback.model_source)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass for a pm judge")
    parser.add_argument("--plot", default=None, help="write a reliability diagram here")
    parser.add_argument("--save-scores", default=None, metavar="FILE",
                        help="write one JSON line per pair ({id, line, p_chosen}) as chunks finish; "
                             "a killed run given the same file resumes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.limit < 0:
        raise UserError(f"--limit is {args.limit}; use 0 for all pairs or a positive count")
    if not os.path.exists(args.pairs):
        parser.error(f"--pairs {args.pairs}: file not found")
    enable_compilation_cache()
    stats = ReadStats()
    pairs = read_pairs(args.pairs, on_error="skip", stats=stats, limit=args.limit or None)
    print(f"read {len(pairs)} pairs from {args.pairs} ({stats.skipped} malformed lines skipped)", flush=True)
    if args.judge in ("feedback", "pointwise"):
        overrides = (["feedback.source=pointwise"] if args.judge == "pointwise" else []) + args.set
        overrides += [f"feedback.model_source={args.model}"] if args.model else []
        judge = feedback_judge(load_judge_config(args.config, overrides), not args.no_progress)
    elif args.judge.startswith("pm:"):
        from cai_jax import sharding
        mesh = sharding.mesh_from_config(load_judge_config(args.config, args.set))
        judge = pm_judge(args.judge[3:], args.batch_size, mesh)
    else:
        parser.error(f"--judge {args.judge!r}: use 'feedback', 'pointwise' or 'pm:CHECKPOINT_DIR'")
    score = functools.partial(p_chosen, judge)
    if args.save_scores:
        setting = json.dumps({"judge": args.judge, "model": args.model, "config": args.config,
                              "set": args.set}, sort_keys=True)
        p = score_resumably(pairs, score, args.save_scores, setting, progress=not args.no_progress)
    else:
        p = score(pairs)
    result = {"judge": args.judge, **judge_metrics(p)}
    if getattr(judge, "option_mass", None):
        result["option_mass"] = float(np.mean(judge.option_mass))
        result["seconds_per_pair"] = judge.seconds / len(judge.option_mass)
    if args.model:
        result["model"] = args.model
    print(f"accuracy {result['accuracy']:.3f} (chance 0.5)  mean p(chosen) {result['mean_p_chosen']:.3f}  "
          f"ECE {result['ece']:.3f}  Brier {result['brier']:.3f}  n={result['n']}")
    if args.plot:
        probs = np.concatenate([p, 1.0 - p])
        outcomes = np.concatenate([np.ones_like(p), np.zeros_like(p)])
        plot_reliability(probs, outcomes, args.plot, title=f"{args.judge}: ECE {result['ece']:.3f}")
        print(f"reliability plot: {args.plot}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
