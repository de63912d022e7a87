"""Preference model: score gathering, loss and metrics against NumPy, training
on synthetic soft labels, the scorer, and the pairs -> feedback -> pm_train
pipeline on init:tiny."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import artifacts, sharding as shd
from cai_jax.data.conversation import user
from cai_jax.eval import judges
from cai_jax.inference import preference_scorer as ps
from cai_jax.models.transformer import Transformer
from cai_jax.rl_cai import preference as pm
from cai_jax.weights.loader import LoadedModel, load_model
from cai_jax.weights.model_dir import save_model_dir


@pytest.fixture(scope="module")
def tiny_pm():
    return load_model("init:tiny", ps.SCALAR_HEAD, seed=0, to_device=False)


def _random_head(loaded, seed=1):
    """The loader zero-initialises a new scalar head; give it weights so the
    scores differ per row."""
    params = dict(loaded.params)
    rng = np.random.default_rng(seed)
    params["scalar_head"] = {"kernel": rng.normal(0, 1, params["scalar_head"]["kernel"].shape).astype(np.float32),
                             "bias": np.zeros(1, np.float32)}
    return params


@functools.lru_cache(maxsize=None)
def _forward(model_config):
    return jax.jit(lambda params, tokens, mask: Transformer(model_config).apply(
        {"params": params}, tokens, jnp.arange(tokens.shape[1])[None], mask)[0]["scalar"])


def _score_alone(model_config, params, ids, length=128):
    """Independent: the scalar output at the last token of one row (padded
    after its end to one fixed length, which cannot change causal outputs, so
    one compile serves every row)."""
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(ids)] = ids
    mask = (np.arange(length) < len(ids)).astype(np.int32)[None]
    return float(_forward(model_config)(params, tokens, mask)[0, len(ids) - 1])


def test_pair_loss_and_scores_against_unpadded_rows(tiny_pm):
    params = _random_head(tiny_pm)
    rng = np.random.default_rng(0)
    examples = [{"a": rng.integers(5, 1000, n).tolist(), "b": rng.integers(5, 1000, m).tolist(), "p_a": p}
                for n, m, p in [(7, 12, 0.9), (20, 3, 0.2), (5, 5, 0.5)]]
    batch = pm.pair_batch(examples, min_bucket=16, max_len=64, pad_id=0, rows=4)
    assert batch["tokens"].shape == (4, 2, 32) and batch["weight"].tolist() == [1, 1, 1, 0]
    loss_sum, count, metrics = jax.jit(pm.make_pm_loss(Transformer(tiny_pm.config)))(
        params, jax.tree.map(jnp.asarray, batch), None)
    r = np.asarray([[_score_alone(tiny_pm.config, params, e[k]) for k in ("a", "b")] for e in examples])
    assert np.ptp(r) > 0.1
    d, p = r[:, 0] - r[:, 1], np.asarray([e["p_a"] for e in examples])
    expected = -(p * np.log(1 / (1 + np.exp(-d))) + (1 - p) * np.log(1 / (1 + np.exp(d))))
    assert float(count) == 3
    np.testing.assert_allclose(float(loss_sum), expected.sum(), rtol=1e-4)
    decided_right = sum((d[i] > 0) == (p[i] > 0.5) for i in range(2))
    assert float(metrics["accuracy"]) == decided_right
    m = pm.pair_metrics(d, p)
    np.testing.assert_allclose(m["loss"], expected.mean(), rtol=1e-9)
    assert m["accuracy"] == decided_right / 2 and m["pairs"] == 3


def test_preference_row_keeps_the_end_when_too_long(smollm2_tokenizer):
    conv = (user("Hello there, how are you today?"),)
    ids, cut = ps.preference_row(smollm2_tokenizer, conv, "Fine, thanks.", "hh", 1000)
    prompt = smollm2_tokenizer("\n\nHuman: Hello there, how are you today?\n\nAssistant:",
                               add_special_tokens=False)["input_ids"]
    answer = smollm2_tokenizer(" Fine, thanks.", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer and not cut
    short, cut = ps.preference_row(smollm2_tokenizer, conv, "Fine, thanks.", "hh", 5)
    assert short == ids[-5:] and cut
    # Chat: a finished answer ends in "<|im_end|>", where the sampler stops; an
    # answer cut at the token limit does not.
    chat, _ = ps.preference_row(smollm2_tokenizer, conv, "Fine, thanks.", "chat", 1000)
    cut_off, _ = ps.preference_row(smollm2_tokenizer, conv, "Fine, thanks.", "chat", 1000, complete=False)
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": conv[0].content}],
                                                   tokenize=False, add_generation_prompt=True)
    body = smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"] + \
        smollm2_tokenizer("Fine, thanks.", add_special_tokens=False)["input_ids"]
    assert cut_off == body
    assert chat == body + [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")]


# Synthetic preferences: each answer ends in one of four words with a hidden
# utility; the label of a pair is sigmoid(u_a - u_b), a soft label.
WORDS = ("apple", "river", "stone", "cloud")
UTILITY = np.asarray([-1.5, -0.5, 0.5, 1.5])


def _synthetic_pairs(n, seed):
    rng = np.random.default_rng(seed)
    fillers = ["the", "a", "one", "some", "my", "our", "that", "this"]
    out = []
    for i in range(n):
        wa, wb = rng.choice(4, size=2, replace=False)
        pre = lambda: " ".join(rng.choice(fillers, size=rng.integers(1, 4)))  # noqa: E731
        out.append({"id": f"s{seed}-{i}", "kind": "harmless", "conversation": (user("Say a word."),),
                    "a": f"{pre()} {WORDS[wa]}", "b": f"{pre()} {WORDS[wb]}",
                    "p_a": float(1 / (1 + np.exp(-(UTILITY[wa] - UTILITY[wb]))))})
    return out


def _section(**changes):
    section = pm.get_default_config()
    section.update(dict(batch_size=8, max_seq_len=64, min_bucket=64, eval_every=0, save_every=1000,
                        eval_batch_size=16))
    section.optimizer.update(dict(learning_rate=3e-3, warmup_steps=5, schedule="constant",
                                  grad_clip_norm=1.0))
    section.update(changes)
    return section


def _p_first(scorer, convs, answers_a, answers_b):
    """p(answer A preferred) per pair, by the PM judge (eval/judges.py)."""
    verdicts = judges.PreferenceModelJudge(scorer).judge(
        [judges.ModelComparison(str(i), conv, "a", "b", a, b)
         for i, (conv, a, b) in enumerate(zip(convs, answers_a, answers_b))])
    return np.asarray([v.outcome for v in verdicts])


def test_pm_recovers_soft_label_ordering_and_probabilities(tiny_pm, tmp_path):
    tok = tiny_pm.tokenizer
    train, _ = pm.tokenize_pairs(_synthetic_pairs(240, 0), tok, "hh", 64)
    held, _ = pm.tokenize_pairs(_synthetic_pairs(48, 1), tok, "hh", 64)
    section = _section()
    mesh = shd.make_mesh({"data": -1})
    params, metrics = pm.train_phase(
        name="synthetic", model_config=tiny_pm.config, params=tiny_pm.params, train=train,
        held_out=held, num_steps=120, section=section, optimizer_cfg=section.optimizer.to_dict(),
        mesh=mesh, directory=str(tmp_path / "run"), seed=0, pad_id=0, progress=False)
    assert metrics["accuracy"] == 1.0
    assert metrics["calibration_gap"] < 0.05, metrics
    # Scores of the four words follow the hidden utilities.
    trained = LoadedModel(tiny_pm.config, jax.tree.map(np.asarray, params), tok, "trained")
    scorer = ps.PreferenceScorer(trained, style="hh", max_len=64, mesh=mesh)
    word_scores = scorer.score([(user("Say a word."),)] * 4, [f"the {w}" for w in WORDS])
    assert list(np.argsort(word_scores)) == [0, 1, 2, 3]
    p = _p_first(scorer, [(user("Say a word."),)], ["the cloud"], ["the apple"])[0]
    assert abs(p - 1 / (1 + np.exp(-3.0))) < 0.05


def test_scorer_reads_the_saved_model_and_matches_a_full_forward(tiny_pm, tmp_path):
    params = _random_head(tiny_pm, seed=4)
    save_model_dir(str(tmp_path / "pm"), tiny_pm.config, params, tiny_pm.tokenizer,
                   about={"render": "hh", "max_seq_len": 128})
    scorer = ps.PreferenceScorer.from_dir(str(tmp_path / "pm"), batch_size=2, mesh=shd.make_mesh({"data": -1}))
    assert scorer.style == "hh" and scorer.max_len == 128
    convs = [(user("Hi"),), (user("What is two plus two?"),), (user("Bye"),)]
    answers = ["Hello!", "Four, of course.", "See you"]
    scores = scorer.score(convs, answers)
    for conv, answer, s in zip(convs, answers, scores):
        ids, _ = ps.preference_row(tiny_pm.tokenizer, conv, answer, "hh", 128)
        assert abs(s - _score_alone(tiny_pm.config, params, ids)) < 1e-4
    others = ["Go away.", "Five.", "Later!"]
    p = _p_first(scorer, convs, answers, others)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(scores - scorer.score(convs, others)))), atol=1e-9)


def test_scorer_refuses_a_policy_directory(tmp_path):
    # Eval's "pm:DIR" judge reads through from_dir too: a policy must not
    # become a PM with a zero head that calls every pair a tie.
    policy = load_model("init:tiny", seed=0, to_device=False)
    save_model_dir(str(tmp_path / "policy"), policy.config, policy.params, policy.tokenizer)
    with pytest.raises(ValueError, match=r"a preference model needs heads=\('scalar',\), got \('lm',\)"):
        ps.PreferenceScorer.from_dir(str(tmp_path / "policy"), mesh=shd.make_mesh({"data": -1}))


def _label(id_, kind, p_a, a="1", b="2", complete_a=True):
    return {"id": id_, "kind": kind, "p_a": p_a, "conversation": [{"role": "user", "content": "q"}],
            "answer_a": a, "answer_b": b, "complete_a": complete_a, "complete_b": True}


def test_malformed_labels_are_errors_naming_file_and_line(tmp_path):
    path = str(tmp_path / "labels.jsonl")
    artifacts.write_jsonl_atomic(path, [_label("a", "harmless", 0.5), _label("b", "harmless", 1.7)])
    with pytest.raises(ValueError, match=r"labels.jsonl line 2: 'p_a' is 1.7"):
        pm.ai_labelled_pairs(path)
    old = {"id": "a", "kind": "harmless", "p_a": 0.5}  # written before labels carried their pairs
    artifacts.write_jsonl_atomic(path, [old])
    with pytest.raises(ValueError, match=r"labels.jsonl line 1: no \['conversation', 'answer_a'.*feedback stage"):
        pm.ai_labelled_pairs(path)
    artifacts.write_jsonl_atomic(path, [{**_label("a", "harmless", 0.5), "conversation": "q"}])
    with pytest.raises(ValueError, match=r"labels.jsonl line 1: 'conversation' is not a list of turns"):
        pm.ai_labelled_pairs(path)


def test_pairs_feedback_pm_train_end_to_end(tmp_path):
    """The three RL-CAI data stages through the pipeline on init:tiny, with a
    random init:tiny standing in for the SL-CAI model."""
    from cai_jax import pipeline
    from cai_jax.config import load_config_module
    from cai_jax.rl_cai import feedback, pairs

    config = load_config_module(os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")).base_config()
    config.model.name = "tiny"
    config.data.update(dict(red_team_limit=4, helpful_limit=2))
    config.sampling.update(dict(max_new_tokens=8, batch_size=4))
    config.pairs = pairs.get_default_config()
    config.feedback = feedback.get_default_config()
    config.feedback.update(dict(num_principles=2, num_exemplars=1, batch_size=8, max_seq_len=512))
    config.pm_train = pm.get_default_config()
    config.pm_train.update(dict(num_steps=3, batch_size=2, max_seq_len=128, eval_fraction=0.2,
                                eval_every=2, save_every=2, pmp_steps=2, pmp_limit=6,
                                pmp_path=str(tmp_path / "pmp.jsonl.gz")))
    _write_hh(tmp_path / "pmp.jsonl.gz", 8)
    sl = load_model("init:tiny", seed=5, to_device=False)
    save_model_dir(str(tmp_path / "models" / "sl_cai"), sl.config, sl.params, sl.tokenizer)

    rows = pipeline.run_pipeline(config, str(tmp_path), ["pairs", "feedback", "pm_train"], progress=False)
    assert [r["stage"] for r in rows] == ["pairs", "feedback", "pm_train"]
    labels = artifacts.read_jsonl(str(tmp_path / "labels.jsonl"))
    pair_records = artifacts.read_jsonl(str(tmp_path / "pairs.jsonl"))
    assert [r["id"] for r in labels] == [r["id"] for r in pair_records] and len(labels) == 6
    for r, pair in zip(labels, pair_records):  # each label carries its pair
        assert 0.0 <= r["p_a"] <= 1.0 and len(r["principle_ids"]) == 2
        assert (r["conversation"], r["answer_a"], r["answer_b"]) == (pair["prompt"], pair["answer_a"],
                                                                     pair["answer_b"])
        assert r["complete_a"] == (pair["finish_a"] != "length") and r["kind"] == pair["kind"]
        assert abs(r["p_a"] - np.mean(feedback.combine_orders(r["p_first_ab"], r["p_first_ba"]))) < 1e-12
    fb_row, pm_row = rows[1], rows[2]
    assert fb_row["labels"] == 6 and 0.0 <= fb_row["position_bias"] <= 1.0
    # judge_fraction 0.5: the reward PM and the judge PM learn from disjoint prompts' pairs.
    assert pm_row["train_pairs"] + pm_row["eval_pairs"] + pm_row["judge_train_pairs"] \
        + pm_row["judge_eval_pairs"] == 6 and pm_row["steps"] == pm_row["judge_steps"] == 3
    split = json.load(open(tmp_path / "pm_train" / "prompts.json"))
    assert split["pm"] and split["pm_judge"] and not set(split["pm"]) & set(split["pm_judge"])
    assert set(split["pm"]) | set(split["pm_judge"]) == {r["id"].split("#")[0] for r in labels}
    judge_metrics = artifacts.read_jsonl(str(tmp_path / "pm_train" / "judge" / "metrics.jsonl"))
    assert [m["step"] for m in judge_metrics] == [1, 2, 3]
    assert pm_row["pmp_pairs"] == 5 and pm_row["pmp_steps"] == 2  # 6 read, 1 held out
    assert len(artifacts.read_jsonl(str(tmp_path / "pm_train" / "pmp" / "metrics.jsonl"))) == 2
    metrics = artifacts.read_jsonl(str(tmp_path / "pm_train" / "main" / "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2, 3] and "eval_loss" in metrics[1]

    mesh = shd.mesh_from_config(config)
    scorer = ps.PreferenceScorer.from_dir(str(tmp_path / "models" / "pm"), mesh=mesh)
    assert scorer.style == config.data.render and scorer.config.heads == ("scalar",)
    conv = tuple(user(t["content"]) for t in pair_records[0]["prompt"])
    assert np.isfinite(scorer.score([conv], [pair_records[0]["answer_a"]])).all()

    judge = ps.PreferenceScorer.from_dir(str(tmp_path / "models" / "pm_judge"), mesh=mesh)
    two = [judge.score([conv], [pair_records[0]["answer_a"]]), scorer.score([conv], [pair_records[0]["answer_a"]])]
    assert np.isfinite(two).all() and two[0] != two[1]  # another model, not a copy

    again = pipeline.run_pipeline(config, str(tmp_path), ["pairs", "feedback", "pm_train"], progress=False)
    assert all(r["status"] == "skipped (complete)" for r in again)
    # The judge PM is an output: gone, the stage reruns; not asked for, it is not expected.
    shutil.rmtree(tmp_path / "models" / "pm_judge")
    fingerprint = pipeline.stage_fingerprint(config, str(tmp_path), "pm_train")
    assert pipeline.rerun_reason(str(tmp_path), "pm_train", fingerprint) == "models/pm_judge is missing"
    assert pipeline.stage_outputs(config, "pm_train") == ("models/pm", "models/pm_judge")
    config.pm_train.judge_fraction = 0.0
    assert pipeline.stage_outputs(config, "pm_train") == ("models/pm",)


def _write_hh(path, n):
    import gzip
    import json
    with gzip.open(path, "wt") as f:
        for i in range(n):
            ctx = f"\n\nHuman: question {i}?"
            f.write(json.dumps({"chosen": f"{ctx}\n\nAssistant: kind answer {i}",
                                "rejected": f"{ctx}\n\nAssistant: rude answer {i}"}) + "\n")


def test_training_mix_ai_or_human_helpfulness(tmp_path):
    from cai_jax.config import load_config_module

    artifacts.write_jsonl_atomic(str(tmp_path / "labels.jsonl"), [
        _label("h1", "harmless", 0.3, "a", "b", complete_a=False), _label("p1", "helpful", 0.6, "c", "d"),
        _label("p2", "helpful", 0.9, "e", "f")])
    _write_hh(tmp_path / "helpful.jsonl.gz", 3)
    config = load_config_module(os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")).base_config()
    config.pm_train = pm.get_default_config()
    config.pm_train.helpful_limit = 1
    mix = pm.training_pairs(config, str(tmp_path))
    assert [(p["id"], p["p_a"]) for p in mix] == [("h1", 0.3), ("p1", 0.6)]
    assert mix[0]["complete_a"] is False and mix[0]["complete_b"] is True
    config.pm_train.helpful_pairs_path = str(tmp_path / "helpful.jsonl.gz")
    config.pm_train.helpful_limit = 0
    mix = pm.training_pairs(config, str(tmp_path))
    assert [p["id"] for p in mix] == ["h1"] + [f"helpful_human:helpful.jsonl.gz:{i}" for i in (1, 2, 3)]
    assert mix[1]["a"] == "kind answer 0" and mix[1]["b"] == "rude answer 0" and mix[1]["p_a"] == 1.0
