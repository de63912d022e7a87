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


# ------------------------------------------------------------ the evaluation's judges on HH pairs

def _pairs(n):
    from cai_jax.data.conversation import user
    from cai_jax.data.hh_rlhf import PreferencePair

    return [PreferencePair((user(f"q{i}"),), f"chosen {i}", f"rejected {i}", i + 1, "f.jsonl")
            for i in range(n)]


def _record(i, orders):
    """A labeler record like FeedbackLabeler's (both orders or one) or
    PointwiseLabeler's (no first-slot probabilities), for the i-th comparison."""
    ab, ba = [0.9 - 0.1 * i, 0.6], [0.3, 0.2 + 0.1 * i]
    if orders == 2:
        return {"p_first_ab": ab, "p_first_ba": ba, "option_mass": 0.5,
                "p_a": float(np.mean([(x + 1 - y) / 2 for x, y in zip(ab, ba)]))}
    if orders == 1:
        return {"p_first_ab": ab, "p_a": float(np.mean(ab)), "option_mass": 0.5}
    return {"p_a": 0.55 + 0.1 * i, "option_mass": 0.5}


class _Labeler:
    def __init__(self, orders):
        self.orders, self.both_orders, self.asked = orders, orders == 2, []

    def label(self, comparisons, progress=False):
        self.asked += [(c.id, c.kind, c.answer_a) for c in comparisons]
        return [{"id": c.id, **_record(i, self.orders)} for i, c in enumerate(comparisons)]


@pytest.mark.parametrize("orders", [2, 1, 0])
def test_feedback_judge_gives_the_labelers_label_and_asks_by_pair(orders):
    """p(chosen) is the label the feedback stage would write (both orders, one
    order, pointwise), asked under the harmlessness principles with the chosen
    answer as A and the pair's file:line as the comparison (its principle draw)."""
    from cai_jax.eval import judges

    labeler = _Labeler(orders)
    judge = judges.FeedbackJudge(labeler, "harmless", require_both_orders=False)
    p = score_pairs.p_chosen(judge, _pairs(3))
    np.testing.assert_allclose(p, [_record(i, orders)["p_a"] for i in range(3)], rtol=0, atol=1e-15)
    assert labeler.asked == [(f"f.jsonl:{i + 1}", "harmless", f"chosen {i}") for i in range(3)]
    assert judge.option_mass == [0.5] * 3 and judge.seconds >= 0
    if orders < 2:  # the evaluation's judge needs both orders
        with pytest.raises(ValueError, match="both_orders"):
            judges.FeedbackJudge(labeler, "harmless")


def test_pm_judge_gives_score_pairs_and_the_evaluation_the_same_preference():
    from cai_jax.data.conversation import Turn
    from cai_jax.data.prompt_sets import Prompt
    from cai_jax.eval import evaluate, judges

    class Scorer:
        def score(self, conversations, answers):
            return np.asarray([len(a) / 3.0 for a in answers])

    judge = judges.PreferenceModelJudge(Scorer())
    pairs = _pairs(2)
    p = score_pairs.p_chosen(judge, pairs)
    np.testing.assert_allclose(p, [1 / (1 + np.exp(-(len(q.chosen) - len(q.rejected)) / 3.0)) for q in pairs],
                               rtol=0, atol=1e-15)
    # The evaluation's comparison of the same answers to the same prompt.
    prompt = Prompt("q0", "", pairs[0].context[0].content, "red_team")
    models = [evaluate.EvalModel("a", "", None, ""), evaluate.EvalModel("b", "", None, "")]
    answers = {("a", "q0"): {"answer": pairs[0].chosen}, ("b", "q0"): {"answer": pairs[0].rejected}}
    [c] = evaluate.comparisons_for(models, [prompt], answers)
    assert c.conversation == (Turn("user", "q0"),) and c.id == "q0|a|b"
    assert judge.judge([c])[0].outcome == p[0]


def test_feedback_judge_on_hh_pairs_gives_the_feedback_stages_labels(shared_data):
    """The tiny model as labeller, two principles in both orders: p(chosen) is
    the label p_a the feedback stage writes for the pair (id file:line)."""
    from cai_jax.rl_cai import feedback

    config = score_pairs.load_judge_config(None, ["feedback.model_source=init:tiny",
                                                  "feedback.num_exemplars=0", "feedback.num_principles=2"])
    pairs = read_pairs(os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz"), limit=3)
    judge = score_pairs.feedback_judge(config, progress=False)
    p = score_pairs.p_chosen(judge, pairs)
    labels = judge.labeler.label([feedback.FeedbackComparison(score_pairs.pair_id(q), "harmless", q.context,
                                                              q.chosen, q.rejected) for q in pairs])
    assert all(len(r["p_first_ba"]) == 2 for r in labels)
    np.testing.assert_allclose(p, [r["p_a"] for r in labels], rtol=0, atol=1e-12)
