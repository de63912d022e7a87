"""The labels bench's arithmetic and report, and a direct cell on the tiny model."""
import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_labels.py")
spec = importlib.util.spec_from_file_location("bench_labels", _PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_accuracy_counts_ties_as_half_with_a_normal_interval():
    cell = bench.accuracy_interval([0.9, 0.2, 0.5, 0.7])
    assert cell["n"] == 4 and cell["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    right = np.array([1, 0, 0.5, 1])
    half = 1.96 * right.std(ddof=1) / 2
    assert cell["low"] == pytest.approx(0.625 - half) and cell["high"] == pytest.approx(0.625 + half)


def test_table_and_figure_from_saved_cells(tmp_path):
    interval = {"n": 10, "accuracy": 0.6, "low": 0.5, "high": 0.7}
    cells = {"baselines": {"prefer the shorter answer": {**interval, "accuracy": 0.55}, "seconds": 0.04},
             "direct/multiple_choice/smollm2": {**interval, "option_mass": 0.4, "seconds_per_label": 0.2},
             "direct/pointwise/smollm2": {**interval, "accuracy": 0.58, "option_mass": 0.9},
             "pm/construction/qwen2.5-coder-0.5b-instruct": {**interval, "labels": 200},
             "pm/construction/qwen2.5-coder-1.5b-instruct": {**interval, "accuracy": 0.62},
             "pm/multiple_choice/smollm2": {**interval, "agreement_with_construction": 0.52,
                                            "option_mass": 0.4},
             "pm/pointwise/smollm2": {**interval, "agreement_with_construction": 0.61}}
    args = bench.parse_args([])
    text = bench.table(cells, args)
    assert ("| labeler judges HH pairs directly (multiple_choice) | smollm2 | 10 | 0.600 [0.500, 0.700] "
            "| 0.40 |  | 0.20 |") in text
    assert "| labeler judges HH pairs directly (pointwise) | smollm2 | 10 | 0.580 [0.500, 0.700] | 0.90 |" in text
    assert "| PM on labels by construction (contrastive framings) | generator qwen2.5-coder-1.5b-instruct | 10 | 0.620" in text
    assert "| 0.52 |" in text
    assert "| PM on pointwise labels of the same pairs | smollm2 |" in text and "| 0.61 |" in text
    bench.figure(cells, args, str(tmp_path / "f.png"))
    assert os.path.getsize(tmp_path / "f.png") > 1000


def test_a_direct_cell_reports_the_labelers_agreement_and_option_mass(shared_data):
    from cai_jax.data.hh_rlhf import read_pairs
    from cai_jax.tools.score_pairs import feedback_judge, p_chosen

    args = bench.parse_args(["--config", os.path.join(os.path.dirname(_PATH), "..", "configs", "tiny.py")])
    hh = read_pairs(os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz"), on_error="skip",
                    limit=3)
    cell = bench.direct(args, "pointwise", "base", hh)
    # The same labeler through score_pairs' judge gives the same labels.
    again = feedback_judge(bench.bench_config(args, "feedback.source=pointwise", "feedback.model_source=base"),
                           progress=False)
    assert cell == {**cell, **bench.accuracy_interval(p_chosen(again, hh))}
    assert cell["n"] == 3 and 0 < cell["option_mass"] <= 1 and cell["seconds_per_label"] > 0


def test_unscored_hh_prompts_share_no_first_turn_with_the_scored_pairs(tmp_path):
    """--prompt_source hh_unscored: prompts from the lines after the scored ones
    and the margin, without a first turn that a scored (or margin) line has."""
    import gzip
    import json

    def line(question, answer):
        return json.dumps({"chosen": f"\n\nHuman: {question}\n\nAssistant: {answer}",
                           "rejected": f"\n\nHuman: {question}\n\nAssistant: no"})
    questions = [f"q{i}" for i in range(8)] + ["q1", "q9", "q3", "q10"]  # q1 and q3 repeat scored ones
    source = tmp_path / "hh.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.write("\n".join(line(q, "a") for q in questions) + "\n")
    args = bench.parse_args(["--pairs", str(source), "--limit", "3", "--out", str(tmp_path / "out")])
    bench.SCORED_MARGIN, margin = 5, bench.SCORED_MARGIN  # lines 0-7 scored or margin
    try:
        path = bench.unscored_hh_file(args, str(tmp_path / "work"))
    finally:
        bench.SCORED_MARGIN = margin
    from cai_jax.data.hh_rlhf import read_red_team_prompts
    prompts = read_red_team_prompts(path, "first_turn", on_error="raise", unique=True)
    assert [p.conversation[0].content for p in prompts] == ["q9", "q10"]
    assert os.path.basename(path) == "hh_rest.jsonl.gz"
    assert bench.on_prompts(args) == "" and bench.on_prompts(
        bench.parse_args(["--prompt_source", "hh_unscored", "--prompts", "50"])) == " on 50 unscored HH prompts"
