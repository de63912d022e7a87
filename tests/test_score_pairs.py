"""The score_pairs command: metrics by hand, both judges on HH pairs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import artifacts
from cai_jax.data.hh_rlhf import read_pairs
from cai_jax.models.transformer import Transformer
from cai_jax.inference import preference_scorer as ps
from cai_jax.tools import score_pairs
from cai_jax.weights.loader import load_model
from cai_jax.weights.model_dir import save_model_dir


def test_metrics_by_hand():
    m = score_pairs.judge_metrics([0.9, 0.6, 0.3])
    assert m["n"] == 3 and abs(m["accuracy"] - 2 / 3) < 1e-12 and abs(m["mean_p_chosen"] - 0.6) < 1e-12
    assert abs(m["brier"] - (0.01 + 0.16 + 0.49) / 3) < 1e-12
    # Both orientations, each value alone in its bin: mean |outcome - p| over
    # (0.9,1) (0.6,1) (0.3,1) (0.1,0) (0.4,0) (0.7,0).
    assert abs(m["ece"] - (0.1 + 0.4 + 0.7 + 0.1 + 0.4 + 0.7) / 6) < 1e-9
    with pytest.raises(ValueError, match="no pairs"):
        score_pairs.judge_metrics([])


def _last_json(capsys):
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return json.loads(lines[-1])


def test_feedback_judge_on_hh_pairs(shared_data, tmp_path, capsys):
    path = os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz")
    plot = tmp_path / "reliability.png"
    score_pairs.main(["--pairs", path, "--limit", "3", "--judge", "feedback", "--model", "init:tiny",
                      "--set", "feedback.num_principles=1", "--set", "feedback.num_exemplars=0",
                      "--plot", str(plot), "--no-progress"])
    result = _last_json(capsys)
    assert result["judge"] == "feedback" and result["n"] == 3 and result["model"] == "init:tiny"
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["brier"] <= 1.0
    assert plot.exists() and plot.stat().st_size > 0


def test_pm_judge_matches_an_independent_forward(shared_data, tmp_path, capsys):
    path = os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz")
    loaded = load_model("init:tiny", ps.SCALAR_HEAD, to_device=False)
    params = dict(loaded.params)
    params["scalar_head"] = {"kernel": np.random.default_rng(0).normal(0, 1, (loaded.config.d_model, 1))
                             .astype(np.float32), "bias": np.zeros(1, np.float32)}
    directory = str(tmp_path / "pm")
    save_model_dir(directory, loaded.config, params, loaded.tokenizer,
                   about={"render": "hh", "max_seq_len": 256})
    score_pairs.main(["--pairs", path, "--limit", "4", "--judge", f"pm:{directory}", "--batch-size", "4"])
    result = _last_json(capsys)

    # Independent: each row alone, right-padded to 256 (causal outputs before
    # the padding are unchanged), the score read at its last token.
    model = Transformer(loaded.config)
    forward = jax.jit(lambda p, t, m: model.apply({"params": p}, t, jnp.arange(256)[None], m)[0]["scalar"])
    p_chosen = []
    for pair in read_pairs(path, limit=4):
        scores = []
        for answer in (pair.chosen, pair.rejected):
            ids, _ = ps.preference_row(loaded.tokenizer, pair.context, answer, "hh", 256)
            tokens = np.zeros((1, 256), np.int32)
            tokens[0, :len(ids)] = ids
            mask = (np.arange(256) < len(ids)).astype(np.int32)[None]
            scores.append(float(forward(params, tokens, mask)[0, len(ids) - 1]))
        p_chosen.append(1 / (1 + np.exp(scores[1] - scores[0])))
    expected = score_pairs.judge_metrics(p_chosen)
    assert result["judge"] == f"pm:{directory}" and result["n"] == 4
    for key in ("accuracy", "mean_p_chosen", "ece", "brier"):
        assert abs(result[key] - expected[key]) < 1e-4, key


def test_saved_scores_resume_after_a_kill(tmp_path):
    from cai_jax.data.hh_rlhf import PreferencePair
    from cai_jax.data.conversation import user

    pairs = [PreferencePair((user(f"q{i}"),), "c", "r", i + 1, "f.jsonl") for i in range(5)]
    calls = []

    def judge(part):
        calls.append([p.line for p in part])
        return np.asarray([p.line / 10 for p in part])

    path = str(tmp_path / "scores.jsonl")
    artifacts.write_jsonl_atomic(path + ".partial", [{"id": "f.jsonl:2", "line": 2, "p_chosen": 0.2,
                                                      "setting": "s"}])
    p = score_pairs.score_resumably(pairs, judge, path, "s", chunk=2)
    np.testing.assert_allclose(p, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert calls == [[1, 3], [4, 5]]  # pair 2 was done before the "kill"
    assert [r["id"] for r in artifacts.read_jsonl(path)] == [f"f.jsonl:{i}" for i in range(1, 6)]
    artifacts.write_jsonl_atomic(path + ".partial", [{"id": "f.jsonl:2", "p_chosen": 0.2, "setting": "t"}])
    with pytest.raises(ValueError, match="another setting"):
        score_pairs.score_resumably(pairs, judge, path, "s")
