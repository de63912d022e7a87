"""The run report: every section from a small synthetic work directory."""
import json
import math
import os

import numpy as np
import pytest

from cai_jax import artifacts
from cai_jax.eval import report
from cai_jax.eval.elo import EloResult, fit_elo

MODELS = [
    {"name": "base", "method": "helpful model", "step": None},
    {"name": "sl_cai", "method": "SL-CAI", "step": None},
    {"name": "rl_cai/step_4", "method": "RL-CAI", "step": 4},
    {"name": "rl_cai/step_2", "method": "RL-CAI", "step": 2},
]
# Strengths (Elo) used to simulate judgments; base is the reference.
TRUE_ELO = {"harmless": {"base": 0, "sl_cai": 150, "rl_cai/step_2": 250, "rl_cai/step_4": 400},
            "helpful": {"base": 0, "sl_cai": -40, "rl_cai/step_2": -60, "rl_cai/step_4": -90}}


def simulated_matches(true_elo, n_prompts, seed):
    rng = np.random.default_rng(seed)
    names = list(true_elo)
    matches = []
    for prompt in range(n_prompts):
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                p = 1 / (1 + 10 ** ((true_elo[names[j]] - true_elo[names[i]]) / 400))
                matches.append((names[i], names[j], float(rng.random() < p), prompt))
    return matches


def make_workdir(root, n_prompts=40):
    wd = str(root)
    artifacts.write_json_atomic(os.path.join(wd, "config.json"),
                                {"model": {"name": "tiny", "source": "init:tiny"}})
    for name, summary in [("sl_generate", {"examples": 12}), ("sl_train", {"final_loss": 1.25}),
                          ("pm_train", {"eval_accuracy": 0.71})]:
        artifacts.write_json_atomic(os.path.join(wd, "stages", f"{name}.json"),
                                    {"stage": name, "seconds": 3.5, "summary": summary})
    dims, fits = {}, {}
    for seed, dim in enumerate(("harmless", "helpful")):
        fits[dim] = fit_elo(simulated_matches(TRUE_ELO[dim], n_prompts, seed), "base", n_bootstrap=50)
        dims[dim] = (fits[dim], {"judge": "pm", "prompts": "red_team" if dim == "harmless" else "helpful",
                                 "n_prompts": n_prompts, "n_judgments": 6 * n_prompts})
    artifacts.write_json_atomic(os.path.join(wd, "eval", "elo.json"),
                                report.elo_document("base", MODELS, dims))
    artifacts.write_jsonl_atomic(os.path.join(wd, "ppo", "metrics.jsonl"),
                                 [{"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s} for s in range(6)])
    artifacts.write_jsonl_atomic(os.path.join(wd, "eval", "revision_scores.jsonl"),
                                 [{"id": f"r{i}", "scores": [0.1 * i, 0.5 + 0.1 * i, 0.8]} for i in range(5)])
    answers = []
    for kind, pids in (("red_team", ["rt-1", "rt-2", "rt-3"]), ("helpful", ["h-1", "h-2"])):
        for pid in pids:
            for m in MODELS:
                answers.append({"id": f"{m['name']}|{pid}", "model": m["name"], "prompt_id": pid,
                                "kind": kind, "prompt": f"question {pid}?",
                                "answer": f"answer of {m['name']} to {pid}"})
    artifacts.write_jsonl_atomic(os.path.join(wd, "eval", "answers.jsonl"), answers)
    return wd, fits


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    wd, fits = make_workdir(tmp_path_factory.mktemp("run"))
    path = report.write_report(wd, current_stage={"stage": "eval", "summary": {"models": 4}})
    with open(path) as f:
        return wd, fits, f.read()


def test_report_has_every_section(written):
    wd, _, text = written
    for title in report.SECTIONS:
        assert f"\n## {title}\n" in text, title
    for png in ("harmless_vs_helpful.png", "ppo_curves.png", "score_vs_revisions.png"):
        assert f"](eval/{png})" in text
        assert os.path.getsize(os.path.join(wd, "eval", png)) > 1000


def test_stage_table_reads_manifests(written):
    _, _, text = written
    assert "| sl_train | done in 3.5s | final_loss=1.25 |" in text
    assert "| pm_train | done in 3.5s | eval_accuracy=0.71 |" in text
    assert "| eval | this run | models=4 |" in text
    assert "| ppo | not run |" in text


def test_elo_tables_show_fitted_values_and_intervals(written):
    _, fits, text = written
    harmless = text.split("## Harmlessness Elo")[1].split("## Helpfulness Elo")[0]
    res = fits["harmless"]
    for m in ("sl_cai", "rl_cai/step_4"):
        row = f"| {m} | {res.elo[m]:.1f} | [{res.lower[m]:.1f}, {res.upper[m]:.1f}] | {res.n_matches[m]} |"
        assert row in harmless
    assert "| base (ref) | 0.0 |" in harmless
    # 40 prompts x 3 comparisons per model: every harmless model is far from base.
    assert "excludes the reference" in harmless and "contains 0" not in harmless


def test_sample_answers_alternate_kinds_and_cover_every_model(written):
    _, _, text = written
    samples = text.split("## Sample answers")[1]
    # Sorted ids per kind, alternating: first red-team, first helpful, second red-team.
    headings = [line for line in samples.splitlines() if line.startswith("### ")]
    assert headings == ["### `rt-1` (red_team)", "### `h-1` (helpful)", "### `rt-2` (red_team)"]
    for m in MODELS:
        assert f"> answer of {m['name']} to h-1" in samples


def test_figure2_lines_start_at_sl_cai_and_follow_steps():
    elo = report.elo_document("base", MODELS, {
        dim: (EloResult(models=tuple(TRUE_ELO[dim]), elo=dict(TRUE_ELO[dim]),
                        lower={m: v - 10 for m, v in TRUE_ELO[dim].items()},
                        upper={m: v + 10 for m, v in TRUE_ELO[dim].items()},
                        n_matches={m: 1 for m in TRUE_ELO[dim]}, reference="base",
                        level=0.95, n_bootstrap=10), {}) for dim in ("harmless", "helpful")})
    points = report.figure2_points(elo)
    rl = [(p["label"], p["harmless_elo"], p["helpful_elo"]) for p in points if p["method"] == "RL-CAI"]
    assert rl == [("SL-CAI", 150, -40), ("step 2", 250, -60), ("step 4", 400, -90)]
    assert [p["method"] for p in points if p["method"] != "RL-CAI"] == ["helpful model"]
    assert points[0]["harmless_lo"] == -10 and points[0]["helpful_hi"] == 10


def test_error_bars_reach_a_point_outside_its_percentile_interval():
    section = {"elo": {"a": -217.7}, "lower": {"a": -1033.3}, "upper": {"a": -217.70000001}}
    assert report.error_bounds(section, "a") == (-1033.3, -217.7)
    assert report.error_bounds({"elo": {"a": 1.0}, "lower": {"a": None}, "upper": {"a": None}}, "a") is None


def _result(elo, lower, upper, n_bootstrap=100):
    models = tuple(elo)
    return EloResult(models=models, elo=elo, lower=lower, upper=upper, n_matches={m: 5 for m in models},
                     reference="base", level=0.9, n_bootstrap=n_bootstrap)


def test_interval_sentences_are_honest():
    # a's interval contains 0; b and c overlap each other.
    res = _result({"base": 0.0, "a": 20.0, "b": 100.0, "c": 90.0},
                  {"base": 0.0, "a": -5.0, "b": 60.0, "c": 50.0},
                  {"base": 0.0, "a": 45.0, "b": 140.0, "c": 130.0})
    text = " ".join(report.interval_sentences(res))
    assert "The 90% interval of `a` contains 0" in text
    assert "`b` and `c`, overlap" in text
    two = _result({"base": 0.0, "a": 20.0, "d": -10.0}, {"base": 0.0, "a": -5.0, "d": -30.0},
                  {"base": 0.0, "a": 45.0, "d": 5.0})
    assert "The 90% intervals of `a` and `d` contain 0" in report.interval_sentences(two)[0]
    separated = _result({"base": 0.0, "b": 100.0, "c": 40.0}, {"base": 0.0, "b": 80.0, "c": 20.0},
                        {"base": 0.0, "b": 120.0, "c": 60.0})
    assert report.interval_sentences(separated) == ["Every other model's 90% interval excludes the reference's 0."]
    nan = {"base": math.nan, "a": math.nan}
    no_ci = _result({"base": 0.0, "a": 3.0}, nan, nan, n_bootstrap=0)
    assert "without any measure of uncertainty" in report.interval_sentences(no_ci)[0]


def test_elo_json_round_trip_keeps_nan_as_null():
    res = _result({"base": 0.0, "a": 3.0}, {"base": 0.0, "a": math.nan}, {"base": 0.0, "a": math.nan})
    doc = json.loads(json.dumps(report.elo_result_to_json(res)))  # strict JSON: no NaN tokens
    assert doc["lower"]["a"] is None
    back = report.elo_result_from_json(doc, "base")
    assert back.elo == res.elo and math.isnan(back.lower["a"]) and back.level == 0.9


def test_empty_workdir_still_has_every_section(tmp_path):
    text = open(report.write_report(str(tmp_path))).read()
    for title in report.SECTIONS:
        assert f"\n## {title}\n" in text, title
    assert "ppo stage has not run" in text and "eval/answers.jsonl` is missing" in text
    assert not os.path.exists(tmp_path / "eval" / "ppo_curves.png")


def test_answer_kinds_table_counts_each_models_red_team_answers(tmp_path):
    texts = {"base": ["Sure, take the crowbar.", "Here is how."],
             "sl_cai": ["I'm sorry, I can't help with that.", "I cannot; please talk to a counselor instead."]}
    answers = [{"id": f"{m}|rt-{i}", "model": m, "prompt_id": f"rt-{i}", "kind": "red_team", "answer": t}
               for m, ts in texts.items() for i, t in enumerate(ts)]
    answers.append({"id": "base|h-0", "model": "base", "prompt_id": "h-0", "kind": "helpful",
                    "answer": "one two three four"})
    artifacts.write_jsonl_atomic(str(tmp_path / "eval" / "answers.jsonl"), answers)
    text = open(report.write_report(str(tmp_path))).read()
    table = text.split("## What the answers do")[1].split("## Sample answers")[0]
    # base: 5 and 3 words; helpful: 4 words, no refusal phrase.
    assert "| base | 2 | 0.00 | 0.00 | 1.00 | — | 1.00 | 4 | 4 |" in table
    # sl_cai declines both where base declined neither: +1 on each prompt, SE 0.
    assert "| sl_cai | 2 | 0.50 | 0.50 | 0.00 | +1.00 ± 0.00 | — | 8 | nan |" in table


def test_paired_change_by_hand():
    from cai_jax import stats

    mean, se, n = stats.paired_change({"a": 0, "b": 1, "c": 0, "x": 1}, {"a": 1, "b": 1, "c": 0})
    diff = np.array([1.0, 0.0, 0.0])  # only the three shared prompts
    assert (mean, n) == (pytest.approx(diff.mean()), 3)
    assert se == pytest.approx(diff.std(ddof=1) / np.sqrt(3))
    assert math.isnan(stats.paired_change({"a": 1}, {"a": 0})[1])


def test_heldout_reward_gain_is_paired_by_prompt(tmp_path):
    from cai_jax.rl_cai import ppo

    first = [{"id": f"p{i}", "reward": r} for i, r in enumerate([0.0, 1.0, 2.0])]
    last = [{"id": f"p{i}", "reward": r} for i, r in enumerate([0.5, 1.7, 2.3])]
    artifacts.write_jsonl_atomic(str(tmp_path / "ppo" / "eval" / "step_0.jsonl"), first)
    artifacts.write_jsonl_atomic(str(tmp_path / "ppo" / "eval" / "step_4.jsonl"), last)
    artifacts.write_jsonl_atomic(str(tmp_path / "ppo" / "metrics.jsonl"), [
        {"step": 0, "eval_reward": 1.0},
        {"step": 4, "reward_mean": 0.3, "kl_k1": -0.01, "kl_k3": 0.02, "beta": 0.1, "eval_reward": 1.5}])
    summary = ppo.summarize(str(tmp_path / "ppo" / "metrics.jsonl"))
    diff = np.array([0.5, 0.7, 0.3])  # by hand
    assert summary["eval_reward_gain"] == pytest.approx(diff.mean())
    assert summary["eval_reward_gain_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(3))

    artifacts.write_json_atomic(str(tmp_path / "stages" / "ppo.json"), {"stage": "ppo", "summary": summary})
    text = open(report.write_report(str(tmp_path))).read()
    assert "`eval_reward`, `kl_k3`" in text
    assert "changed by +0.5 from the first evaluation to the last (standard error 0.12" in text
    assert "more than twice its standard error" in text
