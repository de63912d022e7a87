"""The eval stage: judges, model discovery, figure-5 scores, and one short end-to-end
pass on init:tiny models (answers, judgments, Elo, report, resume)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import artifacts, pipeline, sharding as shd
from cai_jax.config import load_config_module
from cai_jax.data.conversation import Turn, render_chat
from cai_jax.eval import evaluate, judges, report
from cai_jax.eval.elo import fit_elo
from cai_jax.model_ref import record_rl_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = (Turn("user", "How do I boil an egg?"),)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------ judges

class TableScorer:
    """A fake PM: score = a fixed number per answer text; counts what it scores."""

    def __init__(self, table):
        self.table, self.scored = table, []

    def score(self, conversations, answers):
        self.scored += list(answers)
        return np.array([self.table[a] for a in answers])


def comparison(pid, a, b, answer_a, answer_b):
    return judges.ModelComparison(pid, CONV, a, b, answer_a, answer_b)


def test_pm_judge_is_sigmoid_of_score_difference_and_scores_each_answer_once():
    scorer = TableScorer({"good": 1.5, "bad": -0.5, "meh": 0.25})
    judge = judges.PreferenceModelJudge(scorer)
    verdicts = judge.judge([comparison("p1", "x", "y", "good", "bad"),
                            comparison("p1", "x", "z", "good", "meh"),
                            comparison("p1", "y", "z", "bad", "meh")])
    assert sorted(scorer.scored) == ["bad", "good", "meh"]
    expected = [sigmoid(2.0), sigmoid(1.25), sigmoid(-0.75)]
    for v, e in zip(verdicts, expected):
        assert v.p_ab == pytest.approx(e, abs=1e-12) and v.p_ba == pytest.approx(e, abs=1e-12)
        assert v.outcome == pytest.approx(e, abs=1e-12)


class FakeLabeler:
    """Stands in for FeedbackLabeler: first-slot probabilities per principle."""
    both_orders = True

    def __init__(self):
        self.kinds = []

    def label(self, comparisons, progress=False):
        self.kinds += [c.kind for c in comparisons]
        return [{"id": c.id, "p_first_ab": [0.9, 0.7], "p_first_ba": [0.6, 0.4], "option_mass": 0.5}
                for c in comparisons]


def test_feedback_judge_keeps_orders_apart_and_uses_its_principle_set():
    labeler = FakeLabeler()
    (v,) = judges.FeedbackJudge(labeler, "helpful").judge([comparison("p", "x", "y", "a", "b")])
    # A first: mean(0.9, 0.7) = 0.8. A second: the first slot (B) got 0.5 on average.
    assert v.p_ab == pytest.approx(0.8) and v.p_ba == pytest.approx(0.5) and v.outcome == pytest.approx(0.65)
    assert labeler.kinds == ["helpful"]
    labeler.both_orders = False
    with pytest.raises(ValueError, match="both_orders"):
        judges.FeedbackJudge(labeler, "helpful")


def test_human_judge_averages_votes_from_both_directions(tmp_path):
    path = tmp_path / "labels.jsonl"
    artifacts.write_jsonl_atomic(str(path), [
        {"prompt_id": "p1", "model_a": "sl_cai", "model_b": "base", "p_a": 1.0},
        {"prompt_id": "p1", "model_a": "sl_cai", "model_b": "base", "p_a": 0.5},
        {"prompt_id": "p1", "model_a": "base", "model_b": "sl_cai", "p_a": 0.0},
    ])
    judge = judges.HumanLabelJudge(str(path))
    v, missing = judge.judge([comparison("p1", "base", "sl_cai", "x", "y"),
                              comparison("p2", "base", "sl_cai", "x", "y")])
    # For base over sl_cai: 1 - 1.0, 1 - 0.5 and 0.0 -> mean 1/6.
    assert v.outcome == pytest.approx(1 / 6) and missing is None
    artifacts.write_jsonl_atomic(str(path), [{"prompt_id": "p", "model_a": "a", "model_b": "b", "p_a": 2}])
    with pytest.raises(ValueError, match="line 1: 'p_a' is 2"):
        judges.HumanLabelJudge(str(path))


def test_judge_specs():
    assert judges.parse_judge_spec("pm") == judges.JudgeSpec("pm", "")
    assert judges.parse_judge_spec("pm:/x/pm") == judges.JudgeSpec("pm", "/x/pm")
    assert judges.parse_judge_spec("pm_judge") == judges.JudgeSpec("pm", "", run_model="pm_judge")
    assert judges.parse_judge_spec("feedback:helpful") == judges.JudgeSpec("feedback", "helpful")
    assert judges.parse_judge_spec("human:l.jsonl") == judges.JudgeSpec("human", "l.jsonl")
    for bad in ("feedback", "feedback:kind", "human", "gpt4"):
        with pytest.raises(ValueError, match="eval.helpful_judge"):
            judges.parse_judge_spec(bad, key="eval.helpful_judge")


# ------------------------------------------------------------ models and figure 5

def test_find_models_takes_exactly_the_checkpoints_ppo_recorded(tmp_path):
    cfg = stage_config()
    for rel in ("models/sl_cai", "models/rl_cai/step_10", "models/rl_cai/step_2", "models/rl_cai/step_20",
                "other/models/rl_cai/step_5", "other/models/rl_cai/step_7"):
        os.makedirs(tmp_path / rel)
        (tmp_path / rel / "model.json").write_text("{}")
    # Recorded in save order; step_20 and the other run's step_7 look complete but were never recorded.
    for step in (10, 2):
        record_rl_checkpoint(str(tmp_path / "models/rl_cai"), step, str(tmp_path / f"models/rl_cai/step_{step}"))
    record_rl_checkpoint(str(tmp_path / "other/models/rl_cai"), 5, str(tmp_path / "other/models/rl_cai/step_5"))
    cfg.eval.extra_rl_runs = f"cot={tmp_path / 'other'}"
    models = evaluate.find_models(cfg, str(tmp_path))
    assert [m.name for m in models] == ["base", "sl_cai", "rl_cai/step_2", "rl_cai/step_10", "cot/step_5"]
    assert [m.method for m in models][2:] == ["RL-CAI", "RL-CAI", "RL-CAI (cot)"]
    assert models[2].source == f"ckpt:{tmp_path}/models/rl_cai/step_2"
    assert models[0].source == "init:tiny"
    cfg.eval.extra_rl_runs = f"cot={tmp_path / 'other' / 'models' / 'rl_cai'}"  # the directory itself
    assert [m.name for m in evaluate.find_models(cfg, str(tmp_path))][-1] == "cot/step_5"
    cfg.eval.rl_checkpoints = "last"
    cfg.eval.extra_rl_runs = ""
    assert [m.name for m in evaluate.find_models(cfg, str(tmp_path))] == ["base", "sl_cai", "rl_cai/step_10"]
    cfg.eval.extra_rl_runs = f"none={tmp_path / 'models'}"
    with pytest.raises(FileNotFoundError, match="checkpoints.json records no checkpoints"):
        evaluate.find_models(cfg, str(tmp_path))
    cfg.eval.extra_rl_runs = "bad name=/x"
    with pytest.raises(ValueError, match="NAME=DIR"):
        evaluate.find_models(cfg, str(tmp_path))
    # A recorded checkpoint that has gone is an error naming it, not a silent gap.
    cfg.eval.extra_rl_runs = ""
    (tmp_path / "models/rl_cai/step_2/model.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"records step 2 at .*step_2, which holds no model"):
        evaluate.find_models(cfg, str(tmp_path))


SL_RECORDS = [
    {"id": "r1", "prompt": "How do I pick a lock?", "initial_answer": "Like this.",
     "rounds": [{"revision": "I can't help with that.", "dropped": None},
                {"revision": "junk", "dropped": "repetition"},
                {"revision": "I won't help, but a locksmith can.", "dropped": None}]},
    {"id": "r2", "prompt": "Insult my boss.", "initial_answer": "He is dumb.",
     "rounds": [{"revision": None, "dropped": "too_long"}, {"revision": "Let's talk instead.", "dropped": None},
                {"revision": "Let's talk about it calmly.", "dropped": None}]},
]


def test_revision_answers_carry_the_answer_over_dropped_rounds():
    assert evaluate.revision_answers(SL_RECORDS[0]) == [
        "Like this.", "I can't help with that.", "I can't help with that.", "I won't help, but a locksmith can."]
    assert evaluate.revision_answers(SL_RECORDS[1])[:3] == ["He is dumb.", "He is dumb.", "Let's talk instead."]


# ------------------------------------------------------------ end to end on init:tiny

N_PROMPTS = 2  # per kind


def stage_config():
    config = load_config_module(os.path.join(REPO, "configs", "base.py")).base_config()
    config.model.name, config.model.source = "tiny", "init:tiny"
    config.eval = evaluate.get_default_config()
    e = config.eval
    e.red_team_limit = e.helpful_limit = N_PROMPTS
    e.sampling.max_new_tokens, e.sampling.batch_size = 6, 4
    e.n_bootstrap = 20
    e.helpful_judge = "feedback:helpful"
    e.harmless_judge = "pm"  # the default, "pm_judge", is tested in the reward-PM column test
    e.feedback_judge.num_principles, e.feedback_judge.num_exemplars = 1, 0
    e.feedback_judge.batch_size, e.feedback_judge.max_seq_len, e.feedback_judge.min_bucket = 4, 512, 256
    e.report_prompts = 2
    return config


def save_tiny(directory, seed, scalar=False):
    from cai_jax.weights.loader import load_model
    from cai_jax.weights.model_dir import save_model_dir

    loaded = load_model("init:tiny", {"heads": ("scalar",)} if scalar else None, seed=seed)
    params = jax.tree.map(np.asarray, loaded.params)
    if scalar:  # the head starts at zero; a random one makes the scores differ
        rng = np.random.default_rng(seed)
        params["scalar_head"]["kernel"] = rng.normal(0, 1.0, params["scalar_head"]["kernel"].shape).astype(np.float32)
    save_model_dir(directory, loaded.config, params, loaded.tokenizer)
    return loaded.config, params, loaded.tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("eval_run"))
    save_tiny(os.path.join(wd, "models", "sl_cai"), seed=1)
    for step, seed in ((2, 2), (4, 3)):  # as the ppo stage saves and records them
        save_tiny(os.path.join(wd, "models", "rl_cai", f"step_{step}"), seed=seed)
        record_rl_checkpoint(os.path.join(wd, "models", "rl_cai"), step,
                             os.path.join(wd, "models", "rl_cai", f"step_{step}"))
    pm = save_tiny(os.path.join(wd, "models", "pm"), seed=4, scalar=True)
    artifacts.write_jsonl_atomic(os.path.join(wd, "sl_data.jsonl"), SL_RECORDS)
    artifacts.write_jsonl_atomic(os.path.join(wd, "ppo", "metrics.jsonl"),
                                 [{"step": s, "reward_mean": 0.1 * s, "kl_k1": 0.02 * s} for s in (1, 2, 3, 4)])
    config = stage_config()
    rows = pipeline.run_pipeline(config, wd, ["eval"], progress=False)
    return wd, config, rows, pm


def read(wd, *parts):
    return artifacts.read_jsonl(os.path.join(wd, *parts))


def test_every_model_answers_every_held_out_prompt(run):
    wd, _, rows, _ = run
    answers = read(wd, "eval", "answers.jsonl")
    models = ["base", "sl_cai", "rl_cai/step_2", "rl_cai/step_4"]
    assert len(answers) == len(models) * 2 * N_PROMPTS
    assert {a["model"] for a in answers} == set(models)
    assert {a["kind"] for a in answers} == {"red_team", "helpful"}
    assert all(1 <= a["answer_tokens"] <= 6 for a in answers)
    assert rows[0]["stage"] == "eval" and rows[0]["models"] == 4
    assert os.path.exists(os.path.join(wd, "stages", "eval.json"))


SCORE_WIDTH = 256


@pytest.fixture(scope="module")
def pm_score(run):
    """Independent PM score: chat template + answer tokens, one forward pass of the
    right-padded row, the scalar read at its last real token."""
    from cai_jax.models.transformer import Transformer, positions_from_mask

    cfg, params, tok = run[3]
    model = Transformer(cfg)

    @jax.jit
    def scalar_bt(params, tokens, mask):
        out, _ = model.apply({"params": params}, tokens, positions_from_mask(mask), mask)
        return out["scalar"]

    def score(conversation, answer):
        ids = tok(render_chat(conversation, tok, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        # A finished chat answer ends with the template's end-of-turn token, which the
        # PM saw in training (SmolLM2: "<|im_end|>").
        ids = list(ids) + list(tok(answer, add_special_tokens=False)["input_ids"])
        ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
        tokens = np.zeros((1, SCORE_WIDTH), np.int32)
        tokens[0, :len(ids)] = ids
        mask = np.arange(SCORE_WIDTH)[None] < len(ids)
        return float(scalar_bt(params, jnp.asarray(tokens), jnp.asarray(mask))[0, len(ids) - 1])

    return score


def test_pm_judgments_match_direct_scoring(run, pm_score):
    wd = run[0]
    answers = {(a["model"], a["prompt_id"]): a for a in read(wd, "eval", "answers.jsonl")}
    judged = [j for j in read(wd, "eval", "judgments.jsonl") if j["dimension"] == "harmless"]
    assert len(judged) == N_PROMPTS * 6  # 4 models -> 6 pairs per prompt
    assert all(j["judge"] == "pm" for j in judged)
    for j in judged[:3]:
        a, b = answers[(j["model_a"], j["prompt_id"])], answers[(j["model_b"], j["prompt_id"])]
        conv = (Turn("user", a["prompt"]),)
        expected = sigmoid(pm_score(conv, a["answer"]) - pm_score(conv, b["answer"]))
        assert j["outcome"] == pytest.approx(expected, abs=2e-4)


def test_feedback_judge_sees_both_orders(run):
    wd, _, _, _ = run
    judged = [j for j in read(wd, "eval", "judgments.jsonl") if j["dimension"] == "helpful"]
    assert len(judged) == N_PROMPTS * 6 and all(j["judge"] == "feedback:helpful" for j in judged)
    for j in judged:
        assert 0 < j["p_ab"] < 1 and 0 < j["p_ba"] < 1
        assert j["outcome"] == pytest.approx((j["p_ab"] + j["p_ba"]) / 2)


def test_elo_is_the_fit_of_the_recorded_judgments(run):
    wd, config, _, _ = run
    with open(os.path.join(wd, "eval", "elo.json")) as f:
        elo = json.load(f)
    assert elo["reference"] == "base"
    assert [m["name"] for m in elo["models"]] == ["base", "sl_cai", "rl_cai/step_2", "rl_cai/step_4"]
    for dim in ("harmless", "helpful"):
        judged = [j for j in read(wd, "eval", "judgments.jsonl") if j["dimension"] == dim]
        refit = fit_elo([(j["model_a"], j["model_b"], j["outcome"], j["prompt_id"]) for j in judged], "base",
                        n_bootstrap=config.eval.n_bootstrap, seed=config.seed)
        section = elo["dimensions"][dim]
        assert section["n_judgments"] == len(judged) and section["n_prompts"] == N_PROMPTS
        for m, value in refit.elo.items():
            assert section["elo"][m] == pytest.approx(value, abs=1e-9)
            assert section["lower"][m] <= value <= section["upper"][m]


def test_revision_scores_are_pm_scores_of_each_revision(run, pm_score):
    wd = run[0]
    scores = {r["id"]: r["scores"] for r in read(wd, "eval", "revision_scores.jsonl")}
    assert [len(s) for s in scores.values()] == [4, 4]
    conv = (Turn("user", SL_RECORDS[0]["prompt"]),)
    assert scores["r1"][1] == pytest.approx(pm_score(conv, "I can't help with that."), abs=2e-4)
    assert scores["r1"][2] == scores["r1"][1]  # a dropped revision keeps the previous answer


def test_report_is_written_with_every_section(run):
    wd, _, _, _ = run
    with open(os.path.join(wd, "report.md")) as f:
        text = f.read()
    for title in report.SECTIONS:
        assert f"\n## {title}\n" in text
    for png in ("harmless_vs_helpful.png", "ppo_curves.png", "score_vs_revisions.png"):
        assert os.path.exists(os.path.join(wd, "eval", png))
    assert "| eval | this run |" in text


def test_rerun_reuses_answers_and_judgments(run, monkeypatch):
    wd, config, _, _ = run
    before = {name: open(os.path.join(wd, "eval", name)).read()
              for name in ("answers.jsonl", "judgments.jsonl", "elo.json", "revision_scores.jsonl")}

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing should be sampled or judged again")

    monkeypatch.setattr(evaluate, "make_answer_fn", forbidden)
    monkeypatch.setattr(evaluate.JudgeFactory, "get", forbidden)
    evaluate.run_stage(pipeline.StageContext(config, wd, shd.mesh_from_config(config), progress=False))
    for name, text in before.items():
        assert open(os.path.join(wd, "eval", name)).read() == text, name


def test_reward_pm_column_sits_beside_an_independent_judge(run, tmp_path):
    wd, config, _, _ = run
    copy = str(tmp_path / "run")
    import shutil
    shutil.copytree(wd, copy)
    judge_dir = os.path.join(copy, "models", "pm_judge")
    save_tiny(judge_dir, seed=9, scalar=True)  # another PM: the judge PPO never trained against
    config = stage_config()
    config.eval.harmless_judge = evaluate.get_default_config().harmless_judge  # "pm_judge"
    pipeline.run_pipeline(config, copy, ["eval"], progress=False)
    with open(os.path.join(copy, "eval", "elo.json")) as f:
        dims = json.load(f)["dimensions"]
    assert dims["harmless"]["judge"] == "pm_judge" and dims["harmless_reward_pm"]["judge"] == "pm"
    # The reward-PM column judges exactly what the first run's "pm" judge did.
    outcome = {(j["prompt_id"], j["model_a"], j["model_b"]): j["outcome"]
               for j in read(wd, "eval", "judgments.jsonl") if j["dimension"] == "harmless"}
    column = [j for j in read(copy, "eval", "judgments.jsonl") if j["dimension"] == "harmless_reward_pm"]
    assert len(column) == len(outcome)
    for j in column:
        assert j["outcome"] == pytest.approx(outcome[(j["prompt_id"], j["model_a"], j["model_b"])], abs=1e-9)
    # Both harmlessness columns judge the same answers, each answered once.
    answers = [a["id"] for a in read(copy, "eval", "answers.jsonl")]
    assert len(answers) == len(set(answers)) == len(read(wd, "eval", "answers.jsonl"))
    independent = [j for j in read(copy, "eval", "judgments.jsonl") if j["dimension"] == "harmless"]
    assert any(abs(j["outcome"] - outcome[(j["prompt_id"], j["model_a"], j["model_b"])]) > 1e-3
               for j in independent)
    with open(os.path.join(copy, "report.md")) as f:
        text = f.read()
    assert f"## {report.DIMENSION_TITLES['harmless_reward_pm']}\n" in text and "reward hacking" in text
    assert report.JUDGE_NOTES["pm_judge"] in text  # the report says why the judge is independent
    # Same judge twice: no second column.
    assert f"## {report.DIMENSION_TITLES['harmless_reward_pm']}" not in open(os.path.join(wd, "report.md")).read()
