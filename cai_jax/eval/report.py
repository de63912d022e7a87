"""The run report: `<workdir>/report.md`, built only from the run's artifacts.

Sections, in order: stage summaries (from `stages/*.json`), the harmlessness
and helpfulness Elo tables (from `eval/elo.json`), figure 2 (harmlessness vs
helpfulness Elo through the RL checkpoints), the PPO curves (from
`ppo/metrics.jsonl`), figure 5 (PM score vs number of revisions, from
`eval/revision_scores.jsonl`) and sample answers (from `eval/answers.jsonl`).
A section whose artifact is missing says so instead of disappearing, so a
reader can tell "not run" from "forgotten".

Plots are PNGs under `<workdir>/eval/`, linked with paths relative to the
report. Because the report reads files only, `write_report(workdir)` can be
rerun at any time (e.g. after editing this module) without loading a model.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from cai_jax import artifacts, pipeline, stats, storage
from cai_jax.eval import answer_rules, plots
from cai_jax.eval.elo import EloResult

# Section titles; tests check that each one is present.
SECTIONS = ("Stages", "Harmlessness Elo", "Helpfulness Elo", "Harmlessness vs helpfulness",
            "PPO training", "PM score vs number of revisions", "What the answers do", "Sample answers")
DIMENSION_TITLES = {"harmless": "Harmlessness Elo", "helpful": "Helpfulness Elo",
                    "harmless_reward_pm": "Harmlessness Elo by PPO's reward model (not independent)"}
# Said under a title: why a column is there and how far to trust it.
DIMENSION_NOTES = {"harmless_reward_pm": (
    "The same red-team comparisons judged by the preference model PPO maximised. PPO was trained "
    "to raise this model's score, so RL-CAI's lead here includes any reward hacking; the "
    "harmlessness Elo above, by a judge PPO never saw, is the one to believe.")}

# Said after a judge's name: what it is and whether PPO trained against it.
JUDGE_NOTES = {
    "pm_judge": ("`pm_judge` is a second preference model, trained with its own seed on the labels of "
                 "prompts whose pairs the reward model `pm` never saw (`pm_train.judge_fraction`); PPO "
                 "never optimised against it, so it is an independent judge of harmlessness, though "
                 "it learnt from the same kind of labels."),
    "pm": ("`pm` is the preference model PPO maximised: not an independent judge (RL-CAI's lead "
           "includes any reward hacking)."),
}

# Keys PPO may log its mean reward and KL under, in order of preference.
_REWARD_KEYS = ("reward_mean", "reward", "pm_reward_mean", "score_mean", "pm_score")
_KL_KEYS = ("kl_k1", "kl", "kl_mean", "mean_kl", "kl_k3")


# ------------------------------------------------------------------ elo.json

def elo_result_from_json(section: dict, reference: str) -> EloResult:
    """Rebuilds an EloResult from one dimension of elo.json (None = no interval)."""
    def floats(d):
        return {k: (math.nan if v is None else float(v)) for k, v in d.items()}
    return EloResult(models=tuple(section["elo"]), elo=floats(section["elo"]),
                     lower=floats(section["lower"]), upper=floats(section["upper"]),
                     n_matches=dict(section["n_matches"]), reference=reference,
                     level=float(section["level"]), n_bootstrap=int(section["n_bootstrap"]))


def elo_result_to_json(result: EloResult) -> dict:
    """One dimension of elo.json: plain dicts, NaN written as null (valid JSON)."""
    def plain(d):
        return {str(k): (None if not np.isfinite(v) else float(v)) for k, v in d.items()}
    return {"elo": plain(result.elo), "lower": plain(result.lower), "upper": plain(result.upper),
            "n_matches": {str(k): int(v) for k, v in result.n_matches.items()},
            "level": result.level, "n_bootstrap": result.n_bootstrap}


def elo_document(reference: str, models: Sequence[dict], dimensions: dict) -> dict:
    """The content of eval/elo.json.

    models: [{"name", "method", "step" (PPO step or None), ...}] in display order;
    dimensions: {"harmless"|"helpful": (EloResult, {"judge", "prompts",
    "n_prompts", "n_judgments"})}.
    """
    return {"reference": reference, "models": list(models),
            "dimensions": {dim: {**meta, **elo_result_to_json(result)}
                           for dim, (result, meta) in dimensions.items()}}


def interval_sentences(result: EloResult) -> list[str]:
    """Plain-language caveats: which differences the bootstrap cannot tell apart.

    Each model's interval is relative to the reference (whose Elo is fixed at
    0), so a model whose interval contains 0 is not distinguishable from the
    reference; the same holds for the top two models when their intervals overlap.
    """
    pct = f"{100 * result.level:g}%"
    finite = [m for m in result.models
              if m != result.reference and np.isfinite(result.lower[m]) and np.isfinite(result.upper[m])]
    if result.n_bootstrap == 0 or not finite:
        return ["No bootstrap intervals were computed (n_bootstrap = 0 or too few prompts), so "
                "these Elo differences come without any measure of uncertainty."]
    sentences = []
    tied = [m for m in finite if result.lower[m] <= 0.0 <= result.upper[m]]
    if tied:
        names = [f"`{m}`" for m in sorted(tied)]
        if len(names) == 1:
            sentences.append(f"The {pct} interval of {names[0]} contains 0: on these prompts it is "
                             f"not distinguishable from the reference `{result.reference}`.")
        else:
            listed = ", ".join(names[:-1]) + f" and {names[-1]}"
            sentences.append(f"The {pct} intervals of {listed} contain 0: on these prompts they are "
                             f"not distinguishable from the reference `{result.reference}`.")
    else:
        sentences.append(f"Every other model's {pct} interval excludes the reference's 0.")
    ranked = sorted(finite, key=lambda m: -result.elo[m])
    if len(ranked) >= 2:
        first, second = ranked[0], ranked[1]
        if result.lower[first] <= result.upper[second]:
            sentences.append(f"The intervals of the two highest-rated non-reference models, "
                             f"`{first}` and `{second}`, overlap: their order may not hold up "
                             f"with more prompts.")
    return sentences


# ------------------------------------------------------------------ figures

def error_bounds(section: dict, name: str) -> Optional[tuple[float, float]]:
    """(lower, upper) of a model in one elo.json dimension, for error bars.

    A percentile bootstrap interval can miss the point estimate itself when
    there are few prompts; the bar is then stretched to reach the estimate
    (plots need intervals that contain their point).
    """
    lo, hi = section["lower"].get(name), section["upper"].get(name)
    if lo is None or hi is None:
        return None
    value = section["elo"][name]
    return min(lo, value), max(hi, value)


def figure2_points(elo: dict) -> list[dict]:
    """plot_harmless_vs_helpful points: every RL method's line starts at SL-CAI
    (PPO starts from it); the base model is a point of its own."""
    dims = elo.get("dimensions", {})
    if "harmless" not in dims or "helpful" not in dims:
        return []
    harmless, helpful = dims["harmless"], dims["helpful"]

    def point(model, method, label):
        name = model["name"]
        if name not in harmless["elo"] or name not in helpful["elo"]:
            return None
        p = {"method": method, "label": label, "harmless_elo": harmless["elo"][name],
             "helpful_elo": helpful["elo"][name]}
        for key, section in (("harmless", harmless), ("helpful", helpful)):
            bounds = error_bounds(section, name)
            if bounds is not None:
                p[f"{key}_lo"], p[f"{key}_hi"] = bounds
        return p

    models = elo.get("models", [])
    sl = [m for m in models if m.get("method") == "SL-CAI"]
    points = []
    for m in models:
        if m.get("step") is None and m.get("method") != "SL-CAI":
            points.append(point(m, m.get("method", m["name"]), m["name"]))
    rl_methods = list(dict.fromkeys(m["method"] for m in models if m.get("step") is not None))
    for method in rl_methods:
        if sl:
            points.append(point(sl[0], method, "SL-CAI"))
        steps = sorted((m for m in models if m.get("method") == method and m.get("step") is not None),
                       key=lambda m: m["step"])
        points += [point(m, method, f"step {m['step']}") for m in steps]
    if not rl_methods and sl:
        points.append(point(sl[0], "SL-CAI", "SL-CAI"))
    points = [p for p in points if p is not None]
    # Error bars need every point of a method to carry bounds; drop partial ones.
    for method in {p["method"] for p in points}:
        group = [p for p in points if p["method"] == method]
        for key in ("harmless", "helpful"):
            if not all(f"{key}_lo" in p for p in group):
                for p in group:
                    p.pop(f"{key}_lo", None), p.pop(f"{key}_hi", None)
    return points


def _pick_key(history: Sequence[dict], candidates: Sequence[str], contains: str) -> Optional[str]:
    present = set().union(*(h.keys() for h in history))
    for key in candidates:
        if key in present:
            return key
    fuzzy = sorted(k for k in present if contains in k
                   and any(isinstance(h.get(k), (int, float)) for h in history))
    return fuzzy[0] if fuzzy else None


def ppo_plot(workdir: str, out_path: str) -> tuple[Optional[str], str]:
    """(png path or None, a sentence saying what was plotted or why not)."""
    path = os.path.join(workdir, "ppo", "metrics.jsonl")
    if not storage.exists(path):
        return None, "No PPO metrics (`ppo/metrics.jsonl` is missing): the ppo stage has not run."
    history = artifacts.read_jsonl(path)
    if not history:
        return None, "`ppo/metrics.jsonl` is empty."
    reward_key = _pick_key(history, _REWARD_KEYS, "reward")
    kl_key = _pick_key(history, _KL_KEYS, "kl")
    if reward_key is None or kl_key is None:
        return None, (f"`ppo/metrics.jsonl` has no reward or KL column (keys: "
                      f"{sorted(set().union(*(h.keys() for h in history)))}).")
    # MetricWriter logs "step"; the plot's x axis reads "iteration".
    history = [{"iteration": h.get("iteration", h.get("step", i)), **h} for i, h in enumerate(history)]
    present = set().union(*(h.keys() for h in history))
    extra = [k for k in ("eval_reward", "kl_k3") if k in present and k not in (reward_key, kl_key)]
    plots.plot_ppo_curves(history, out_path, reward_key=reward_key, kl_key=kl_key, extra_keys=extra)
    sentence = (f"Mean reward (`{reward_key}`) and KL (`{kl_key}`) over {len(history)} logged steps"
                + (f", with {', '.join(f'`{k}`' for k in extra)}" if extra else "") + ".")
    gain = _read_json(os.path.join(workdir, "stages", "ppo.json"))
    summary = (gain or {}).get("summary", {})
    if "eval_reward_gain" in summary:
        d, se = summary["eval_reward_gain"], summary["eval_reward_gain_se"]
        verdict = "more than" if d > 2 * se else "not more than"
        sentence += (f" The held-out PM reward changed by {d:+.4g} from the first evaluation to the "
                     f"last (standard error {se:.2g} across prompts, paired): {verdict} twice its "
                     "standard error.")
    return out_path, sentence


def revision_score_series(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Figure-5 series from revision_scores.jsonl: one [n_prompts, rounds + 1]
    array per number of rounds (examples may differ if generation changed)."""
    by_len: dict[int, list] = {}
    for r in records:
        by_len.setdefault(len(r["scores"]), []).append(r["scores"])
    return {f"{n - 1} revisions ({len(rows)} prompts)": np.asarray(rows, dtype=np.float64)
            for n, rows in sorted(by_len.items()) if n >= 1}


# ------------------------------------------------------------------ sections

def _stage_rows(workdir: str, current: Optional[dict]) -> list[dict]:
    rows = []
    for name in pipeline.ORDER:
        path = os.path.join(workdir, "stages", f"{name}.json")
        if current is not None and current.get("stage") == name:
            rows.append({"stage": name, "status": "this run", **current.get("summary", {})})
        elif storage.exists(path):
            manifest = _read_json(path)
            rows.append({"stage": name, "status": f"done in {manifest.get('seconds', '?')}s",
                         "seconds": manifest.get("seconds"), **manifest.get("summary", {})})
        else:
            rows.append({"stage": name, "status": "not run"})
    return rows


def _elo_section(elo: Optional[dict], dim: str) -> list[str]:
    title = DIMENSION_TITLES[dim]
    section = (elo or {}).get("dimensions", {}).get(dim)
    if section is None and dim not in ("harmless", "helpful"):
        return []  # an optional column that was not asked for
    lines = [f"## {title}", ""]
    if dim in DIMENSION_NOTES:
        lines += [DIMENSION_NOTES[dim], ""]
    if section is None:
        lines += [f"No {dim} judgments in `eval/elo.json` (the judge is disabled or the eval "
                  "stage has not run).", ""]
        return lines
    result = elo_result_from_json(section, elo["reference"])
    lines += [f"Judge: `{section.get('judge', '?')}` on {section.get('n_prompts', '?')} held-out "
              f"{section.get('prompts', '')} prompts, {section.get('n_judgments', '?')} pairwise "
              f"judgments (each shown in both orders). Elo is anchored at `{elo['reference']}` = 0; "
              f"intervals are {100 * result.level:g}% bootstrap percentiles over prompts "
              f"({result.n_bootstrap} resamples).", ""]
    if section.get("judge") in JUDGE_NOTES and dim != "harmless_reward_pm":
        lines += [JUDGE_NOTES[section["judge"]], ""]
    lines += [result.to_markdown().rstrip(), ""]
    lines += [" ".join(interval_sentences(result)), ""]
    return lines


def _answer_kinds_section(workdir: str, model_order: Sequence[str]) -> list[str]:
    """Plain numbers beside Elo, a second judge that no model is: per model, how
    often it refuses, redirects or complies on the held-out red-team prompts
    (eval/answer_rules.py's rule, phrases a reader can check), the change in
    the share that declines from the base model's paired by prompt, how often
    it answers the helpful prompts without a refusal phrase, and how long its
    answers are."""
    lines = ["## What the answers do", ""]
    path = os.path.join(workdir, "eval", "answers.jsonl")
    if not storage.exists(path):
        return lines + ["No answers (`eval/answers.jsonl` is missing).", ""]
    by_model: dict[str, dict[str, dict[str, str]]] = {}
    for a in artifacts.read_jsonl(path):
        by_model.setdefault(a["model"], {}).setdefault(a.get("kind", ""), {})[a["prompt_id"]] = a["answer"]
    models = [m for m in model_order if m in by_model] + sorted(set(by_model) - set(model_order))
    base_declines = {k: answer_rules.declines(t)
                     for k, t in by_model.get("base", {}).get("red_team", {}).items()}
    lines += ["By a transparent phrase rule (`cai_jax/eval/answer_rules.py`), on held-out "
              "red-team prompts: *refuses* declines and offers nothing else, *redirects* declines "
              "or warns and offers an alternative (the paper's non-evasive harmlessness), "
              "*complies* has no refusal phrase; *declines vs base* is the change in refuses + "
              "redirects from the base model's, paired by prompt (± its standard error). On "
              "held-out helpful prompts, *answers helpful* is the share with no refusal phrase "
              "(a collapse into refusing shows here). Mean answer length in words.", "",
              "| model | red-team prompts | refuses | redirects | complies | declines vs base | "
              "answers helpful | words (red-team) | words (helpful) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        red, helpful = by_model[m].get("red_team", {}), by_model[m].get("helpful", {})
        kinds = answer_rules.answer_kind_fractions(red.values())
        change = "—"
        if m != "base" and base_declines:
            mean, se, n = stats.paired_change(
                base_declines, {k: answer_rules.declines(t) for k, t in red.items()})
            change = f"{mean:+.2f} ± {se:.2f}" if n else "—"
        answered = (f"{np.mean([not answer_rules.declines(t) for t in helpful.values()]):.2f}"
                    if helpful else "—")
        helpful_words = (float(np.mean([answer_rules.word_count(t) for t in helpful.values()]))
                         if helpful else float("nan"))
        lines.append(f"| {m} | {len(red)} | {kinds['refuses']:.2f} | {kinds['redirects']:.2f} | "
                     f"{kinds['complies']:.2f} | {change} | {answered} | {kinds['mean_words']:.0f} | "
                     f"{helpful_words:.0f} |")
    return lines + [""]


def _samples_section(workdir: str, model_order: Sequence[str], n_prompts: int) -> list[str]:
    lines = ["## Sample answers", ""]
    path = os.path.join(workdir, "eval", "answers.jsonl")
    if not storage.exists(path):
        return lines + ["No answers (`eval/answers.jsonl` is missing).", ""]
    answers = artifacts.read_jsonl(path)
    by_prompt: dict[str, dict[str, dict]] = {}
    for a in answers:
        by_prompt.setdefault(a["prompt_id"], {})[a["model"]] = a
    models = [m for m in model_order if any(m in v for v in by_prompt.values())]
    models += sorted({a["model"] for a in answers} - set(models))
    complete = sorted(pid for pid, got in by_prompt.items() if all(m in got for m in models))
    # Alternate red-team and helpful prompts so both kinds are shown.
    kinds: dict[str, list[str]] = {}
    for pid in complete:
        kinds.setdefault(by_prompt[pid][models[0]].get("kind", ""), []).append(pid)
    chosen, queues = [], [list(v) for _, v in sorted(kinds.items(), key=lambda kv: kv[0] != "red_team")]
    while len(chosen) < n_prompts and any(queues):
        for q in queues:
            if q and len(chosen) < n_prompts:
                chosen.append(q.pop(0))
    if not chosen:
        return lines + ["No prompt was answered by every model.", ""]
    for pid in chosen:
        first = by_prompt[pid][models[0]]
        lines += [f"### `{pid}` ({first.get('kind', '?')})", "", _quote(first.get("prompt", "")), ""]
        for m in models:
            lines += [f"**{m}:**", "", _quote(by_prompt[pid][m]["answer"]), ""]
    return lines


def _read_json(path: str) -> Optional[dict]:
    if not storage.exists(path):
        return None
    with storage.open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); delete it and rerun the stage "
                             "that writes it") from e


def _quote(text: str) -> str:
    text = text.strip() or "(empty)"
    return "\n".join("> " + line for line in text.splitlines())


def write_report(workdir: str, current_stage: Optional[dict] = None, sample_prompts: int = 3) -> str:
    """Writes `<workdir>/report.md` (and its PNGs under eval/); returns its path.

    `current_stage` = {"stage": name, "summary": {...}} for the stage writing
    the report, whose manifest does not exist yet.
    """
    workdir = storage.abspath(workdir)
    eval_dir = os.path.join(workdir, "eval")
    config = _read_json(os.path.join(workdir, "config.json")) or {}
    elo = _read_json(os.path.join(eval_dir, "elo.json"))

    model = config.get("model", {})
    lines = ["# Constitutional AI run report", "",
             f"Work directory: `{pipeline.home_of(workdir)}`. Base model: `{model.get('name', '?')}` "
             f"(source `{model.get('source', '?')}`).", ""]
    lines += ["## Stages", "", pipeline.format_summary(_stage_rows(workdir, current_stage)), ""]
    for dim in DIMENSION_TITLES:
        lines += _elo_section(elo, dim)

    lines += ["## Harmlessness vs helpfulness", ""]
    points = figure2_points(elo) if elo else []
    if points:
        plots.plot_harmless_vs_helpful(points, os.path.join(eval_dir, "harmless_vs_helpful.png"))
        lines += ["Each RL-CAI line starts at SL-CAI (PPO's starting point) and follows the saved "
                  "PPO checkpoints (the paper's figure 2).", "",
                  "![Harmlessness vs helpfulness Elo](eval/harmless_vs_helpful.png)", ""]
    else:
        lines += ["Needs both harmlessness and helpfulness Elo in `eval/elo.json`.", ""]

    lines += ["## PPO training", ""]
    png, sentence = ppo_plot(workdir, os.path.join(eval_dir, "ppo_curves.png"))
    lines += [sentence, ""] + (["![PPO reward and KL](eval/ppo_curves.png)", ""] if png else [])

    lines += ["## PM score vs number of revisions", ""]
    rev_path = os.path.join(eval_dir, "revision_scores.jsonl")
    series = revision_score_series(artifacts.read_jsonl(rev_path)) if storage.exists(rev_path) else {}
    if series:
        plots.plot_score_vs_revisions(series, os.path.join(eval_dir, "score_vs_revisions.png"))
        lines += ["The preference model scores the initial answer (0 revisions) and each revision in "
                  "`sl_data.jsonl`; mean over prompts with standard errors (the paper's figure 5).", "",
                  "![PM score vs revisions](eval/score_vs_revisions.png)", ""]
    else:
        lines += ["No scores (`eval/revision_scores.jsonl` is missing: the eval stage computes it "
                  "when both `sl_data.jsonl` and the preference model exist).", ""]

    order = [m["name"] for m in (elo or {}).get("models", [])]
    lines += _answer_kinds_section(workdir, order)
    lines += _samples_section(workdir, order, sample_prompts)
    path = os.path.join(workdir, "report.md")
    artifacts.write_text_atomic(path, "\n".join(lines))
    return path
