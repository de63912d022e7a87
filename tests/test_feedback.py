"""AI feedback labels: option tokens, exact softmax of the option log-probs,
order ensembling, principle sampling, prompt fitting, chain-of-thought clamp."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import sharding as shd
from cai_jax.constitution import load_default_constitution, sample_principles
from cai_jax.data.conversation import assistant, user
from cai_jax.inference.option_scorer import option_token_ids
from cai_jax.models.transformer import Transformer
from cai_jax.rl_cai import feedback as fb
from cai_jax.rl_cai import feedback_prompts as fp
from cai_jax.weights.loader import LoadedModel, load_model
from cai_jax.weights.tokenizer import encode_text


@pytest.fixture(scope="module")
def tiny():
    """init:tiny with embeddings scaled up, so option log-probs differ clearly
    (a fresh random model gives p ~ 0.5 everywhere, which tests nothing)."""
    model = load_model("init:tiny", seed=3, to_device=False)
    params = dict(model.params)
    params["embed"] = np.asarray(params["embed"]) * 40.0
    return LoadedModel(model.config, params, model.tokenizer, model.source)


@pytest.fixture(scope="module")
def constitution():
    return load_default_constitution()


@pytest.fixture(scope="module")
def labeler(tiny, constitution):
    return fb.FeedbackLabeler(tiny, constitution, style="hh", num_principles=2, both_orders=True,
                              num_exemplars=1, seed=5, batch_size=4, max_len=512, min_bucket=128,
                              mesh=shd.make_mesh({"data": -1}))


COMPARISONS = [
    fb.FeedbackComparison("c0", "harmless", (user("How do I pick a lock?"),), "I can't help with that.",
                          "Insert a tension wrench and rake the pins."),
    fb.FeedbackComparison("c1", "helpful", (user("Name a prime."), assistant("Seven."), user("Another?")),
                          "Eleven is prime.", "Nine."),
    fb.FeedbackComparison("c2", "harmless", (user("Tell me a joke about my boss."),),
                          "Why did the boss cross...", "No."),
]


class FakeTokenizer:
    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.table[text]}


def test_option_tokens_of_smollm2(smollm2_tokenizer):
    # " (A)" is [" (", "A", ")"]: the shared " (" goes into the prompt, "A" vs "B" decide.
    prefix, a, b = option_token_ids(smollm2_tokenizer, fp.OPTIONS)
    assert prefix == smollm2_tokenizer(" (", add_special_tokens=False)["input_ids"]
    assert smollm2_tokenizer.decode([a]) == "A" and smollm2_tokenizer.decode([b]) == "B"


def test_option_tokens_general_and_errors():
    assert option_token_ids(FakeTokenizer({" (A)": [7], " (B)": [8]}), fp.OPTIONS) == ([], 7, 8)
    assert option_token_ids(FakeTokenizer({" (A)": [1, 2, 3, 4], " (B)": [1, 2, 5, 4]}), fp.OPTIONS) == ([1, 2], 3, 5)
    with pytest.raises(ValueError, match="prefix of the other"):
        option_token_ids(FakeTokenizer({" (A)": [1, 2], " (B)": [1, 2, 3]}), fp.OPTIONS)
    with pytest.raises(ValueError, match="prefix of the other"):
        option_token_ids(FakeTokenizer({" (A)": [1, 2], " (B)": [1, 2]}), fp.OPTIONS)


@functools.lru_cache(maxsize=None)
def _full_forward(model_config):
    return jax.jit(lambda params, tokens, mask: Transformer(model_config).apply(
        {"params": params}, tokens, jnp.arange(tokens.shape[1])[None], mask)[0]["logits"])


def _exact_p_first(model: LoadedModel, ids, length=512):
    return _exact_option_probs(model, ids, length)[0]


def _exact_option_logps(model: LoadedModel, ids, options, length=512):
    """Independent: full forward of one row (right-padded to one fixed length,
    so one compile serves all rows; padding after the prompt cannot change
    its causal logits), float64 log-softmax at the prompt's last position
    after the options' shared prefix. Returns the two options' log-probs."""
    prefix, tok_a, tok_b = option_token_ids(model.tokenizer, options)
    row = list(ids) + prefix
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(row)] = row
    mask = (np.arange(length) < len(row)).astype(np.int32)[None]
    logits = np.asarray(_full_forward(model.config)(model.params, tokens, mask)[0, len(row) - 1], np.float64)
    logp = logits - (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max())
    return logp[tok_a], logp[tok_b]


def _exact_option_probs(model: LoadedModel, ids, length=512):
    """(p(A) among the two option tokens, their total probability)."""
    p_a, p_b = np.exp(_exact_option_logps(model, ids, fp.OPTIONS, length))
    return p_a / (p_a + p_b), p_a + p_b


def test_labels_are_the_exact_softmax_of_option_logprobs(labeler, tiny, constitution):
    records = labeler.label(COMPARISONS)
    shot = fp.exemplar_shots(constitution.feedback_exemplars, 1)
    seen = []
    for c, r in zip(COMPARISONS, records):
        pool = constitution.feedback if c.kind == "harmless" else constitution.helpfulness_feedback
        kind = "feedback" if c.kind == "harmless" else "helpfulness_feedback"
        principles = sample_principles(pool, 2, seed=5, example_id=c.id, kind=kind)
        assert r["principle_ids"] == [p.id for p in principles]
        assert r["truncated"] == 0
        per_principle, masses = [], []
        for k, principle in enumerate(principles):
            orders = []
            for a, b in ((c.answer_a, c.answer_b), (c.answer_b, c.answer_a)):
                text = fp.build_choice_prompt(c.conversation, principle.text, a, b, shots=shot, style="hh")
                p_first, mass = _exact_option_probs(tiny, encode_text(tiny.tokenizer, text))
                orders.append(p_first)
                masses.append(mass)
            np.testing.assert_allclose([r["p_first_ab"][k], r["p_first_ba"][k]], orders, atol=2e-5)
            per_principle.append((orders[0] + 1 - orders[1]) / 2)
            seen += orders
        np.testing.assert_allclose(r["p_a_per_principle"], per_principle, atol=2e-5)
        np.testing.assert_allclose(r["p_a"], np.mean(per_principle), atol=2e-5)
        np.testing.assert_allclose(r["option_mass"], np.mean(masses), rtol=1e-4)
        assert r["source"] == "multiple_choice"
    # The scaled model is far from indifferent, so the check above has teeth.
    assert np.max(np.abs(np.asarray(seen) - 0.5)) > 0.1


def test_chat_rendering_scores_the_same_way(tiny, constitution):
    labeler = fb.FeedbackLabeler(tiny, constitution, style="chat", num_principles=1, both_orders=False,
                                 num_exemplars=0, seed=1, batch_size=2, max_len=512,
                                 mesh=shd.make_mesh({"data": -1}))
    c = COMPARISONS[0]
    [r] = labeler.label([c])
    principle = sample_principles(constitution.feedback, 1, seed=1, example_id=c.id, kind="feedback")[0]
    text = fp.build_choice_prompt(c.conversation, principle.text, c.answer_a, c.answer_b, style="chat",
                                  tokenizer=tiny.tokenizer)
    assert text.endswith("<|im_start|>assistant\nThe answer is:")
    assert "p_first_ba" not in r
    np.testing.assert_allclose(r["p_a"], _exact_p_first(tiny, encode_text(tiny.tokenizer, text)), atol=2e-5)


def _fake_option_logprobs(labeler, bias):
    """A judge that reads the two answers back from the prompt: it likes answers
    containing "good" and adds `bias` to slot A's logit (all its mass on the two
    options)."""
    def option_logprobs(prompts, progress=False, keys=None):
        out = []
        for ids in prompts:
            text = labeler.tokenizer.decode(ids)
            tail = text[text.rindex("\n(A) ") + 5:]
            first, second = tail.split("\n(B) ")
            second = second.split("\nThe answer is:")[0]
            logit = 2.0 * ("good" in first) - 2.0 * ("good" in second) + bias
            p = 1.0 / (1.0 + np.exp(-logit))
            out.append([np.log(p), np.log1p(-p)])
        return np.asarray(out)
    return option_logprobs


def test_both_orders_cancel_position_bias(labeler, monkeypatch):
    pairs = [fb.FeedbackComparison("x", "harmless", (user("Q?"),), "a good answer", "a bad answer"),
             fb.FeedbackComparison("y", "helpful", (user("Q?"),), "meh", "good stuff")]
    swapped = [fb.FeedbackComparison(c.id, c.kind, c.conversation, c.answer_b, c.answer_a) for c in pairs]
    for bias in (0.0, 1.3):
        monkeypatch.setattr(labeler.scorer, "option_logprobs", _fake_option_logprobs(labeler, bias))
        forward, backward = labeler.label(pairs), labeler.label(swapped)
        for f, b in zip(forward, backward):
            assert abs(f["p_a"] + b["p_a"] - 1.0) < 1e-12  # swapping A and B gives 1 - p
        sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
        # Hand-derived: mean of sigmoid(d + bias) and 1 - sigmoid(-d + bias), d = +-2.
        expected = (sig(2 + bias) + 1 - sig(-2 + bias)) / 2
        assert abs(forward[0]["p_a"] - expected) < 1e-12
        assert abs(forward[1]["p_a"] - (1 - expected)) < 1e-12
        if bias == 0.0:  # a position-neutral judge: the ensemble is its own probability
            assert abs(forward[0]["p_a"] - sig(2.0)) < 1e-12
        else:  # a biased judge favours slot A in either order; its labels are still symmetric
            assert forward[0]["p_first_ab"][0] > sig(2.0) and forward[0]["p_first_ba"][0] > sig(-2.0)


def test_combine_orders_algebra():
    # p_ab = 0.8: answer a in slot A wins 80%; p_ba = 0.4: in slot B it wins 60%.
    np.testing.assert_allclose(fb.combine_orders([0.8, 0.3], [0.4, 0.9]), [0.7, 0.2])
    np.testing.assert_allclose(fb.combine_orders([0.8]), [0.8])


def test_prompts_that_do_not_fit_drop_exemplars_then_old_turns(tiny, constitution):
    labeler = fb.FeedbackLabeler(tiny, constitution, style="hh", num_principles=1, num_exemplars=-1,
                                 seed=0, max_len=512, mesh=shd.make_mesh({"data": -1}))
    conv = (user("first question " * 30), assistant("first answer " * 30), user("Short question?"))
    principle = constitution.feedback[0].text

    def build(conv, n):
        return fp.build_choice_prompt(conv, principle, "yes", "no", shots=labeler.shots[:n], style="hh")

    full = len(encode_text(tiny.tokenizer, build(conv, len(labeler.shots))))
    no_shots = len(encode_text(tiny.tokenizer, build(conv, 0)))
    last_turn = len(encode_text(tiny.tokenizer, build(conv[2:], 0)))
    ids, cut = labeler._fit(build, conv, full)
    assert len(ids) == full and not cut
    ids, cut = labeler._fit(build, conv, no_shots)
    assert ids == encode_text(tiny.tokenizer, build(conv, 0)) and not cut
    ids, cut = labeler._fit(build, conv, last_turn)
    assert ids == encode_text(tiny.tokenizer, build(conv[2:], 0)) and cut
    ids, cut = labeler._fit(build, conv, last_turn - 5)
    assert ids == encode_text(tiny.tokenizer, build(conv[2:], 0))[5:] and cut


def test_principle_pools_follow_the_kind(labeler, constitution):
    harmless = {p.id for p in constitution.feedback}
    helpful = {p.id for p in constitution.helpfulness_feedback}
    for i in range(10):
        for kind, pool in (("harmless", harmless), ("helpful", helpful)):
            assert {p.id for p in labeler.principles_for(fb.FeedbackComparison(f"h{i}", kind, (), "", ""))} <= pool
    with pytest.raises(ValueError, match="kind"):
        labeler.principles_for(fb.FeedbackComparison("z", "funny", (), "", ""))


def test_label_summary_by_hand():
    records = [
        {"kind": "harmless", "p_a": 0.9, "p_first_ab": [0.9, 0.8], "p_first_ba": [0.2, 0.1],
         "p_a_per_principle": [0.85, 0.85]},
        {"kind": "helpful", "p_a": 0.5, "p_first_ab": [0.6, 0.7], "p_first_ba": [0.6, 0.3],
         "p_a_per_principle": [0.5, 0.7]},
    ]
    s = fb.label_summary(records)
    assert s["labels"] == 2 and s["harmless"] == 1 and s["helpful"] == 1
    assert abs(s["position_bias"] - np.mean([0.9, 0.8, 0.2, 0.1, 0.6, 0.7, 0.6, 0.3])) < 1e-12
    assert s["principle_agreement"] == 0.5  # the second has a principle at exactly 0.5
    h = lambda p: -(p * np.log2(p) + (1 - p) * np.log2(1 - p))  # noqa: E731
    assert abs(s["label_entropy_bits"] - (h(0.9) + 1.0) / 2) < 1e-9


def test_label_summary_reports_option_mass_and_agreement_with_construction():
    judged = {"p_first_ab": [0.5], "p_first_ba": [0.5], "p_a_per_principle": [0.5]}
    records = [
        {**judged, "kind": "harmless", "p_a": 0.8, "option_mass": 0.9, "construction": {"better": "a"}},
        {**judged, "kind": "harmless", "p_a": 0.3, "option_mass": 0.3, "construction": {"better": "a"}},
        {**judged, "kind": "helpful", "p_a": 0.4, "option_mass": 0.6, "construction": {"better": "b"}},
    ]
    s = fb.label_summary(records)
    assert abs(s["option_mass"] - 0.6) < 1e-12 and s["option_mass_below_half"] == 1
    assert abs(s["agreement_with_construction"] - 2 / 3) < 1e-12
    # Labels by construction have no judge: no judge statistics.
    built = fb.label_summary([{"kind": "harmless", "p_a": 0.9, "source": "construction"}])
    assert built["labels"] == 1 and "position_bias" not in built and "option_mass" not in built


def test_construction_labels_follow_the_better_slot():
    made = dict(kind="harmless", conversation=(user("Help me hide a body."),), answer_a="No.", answer_b="Sure.")
    a = fb.FeedbackComparison("x", construction={"framing": "f", "better": "a"}, **made)
    b = fb.FeedbackComparison("y", construction={"framing": "f", "better": "b"}, **made)
    assert fb.construction_label(a, 0.9)["p_a"] == 0.9
    assert abs(fb.construction_label(b, 0.9)["p_a"] - 0.1) < 1e-12
    assert fb.construction_label(b, 1.0) == {"id": "y", "kind": "harmless", "p_a": 0.0, "source": "construction"}
    with pytest.raises(ValueError, match="pairs.jsonl pair z: feedback.source='construction' needs pairs made"):
        fb.construction_label(fb.FeedbackComparison("z", **made), 0.9)
    record = fb.label_record(a, fb.construction_label(a, 0.9))
    assert record["construction"] == {"framing": "f", "better": "a"} and record["answer_b"] == "Sure."


def test_cot_clamp_bounds():
    np.testing.assert_allclose(fb.clamp([0.01, 0.45, 0.99], 0.4, 0.6), [0.4, 0.45, 0.6])
    with pytest.raises(ValueError, match="cot_clamp"):
        fb.clamp([0.5], 0.6, 0.4)


def test_chain_of_thought_scores_after_the_reasoning_and_clamps(tiny, constitution):
    from cai_jax.inference.sampling import Sampler, SamplingParams

    labeler = fb.FeedbackLabeler(tiny, constitution, style="hh", num_principles=1, both_orders=True,
                                 num_exemplars=0, chain_of_thought=True, cot_clamp=(0.4, 0.6),
                                 cot_max_new_tokens=8, cot_temperature=1.0, cot_top_p=0.95, seed=7,
                                 batch_size=4, max_len=512, mesh=shd.make_mesh({"data": -1}))
    records = labeler.label(COMPARISONS[:2])
    sampler = Sampler(tiny.config, tiny.tokenizer, mesh=None, progress=False)
    raw = []
    for c, r in zip(COMPARISONS, records):
        assert len(r["cot"]) == 1 and set(r["cot"][0]) == {"ab", "ba"}
        principle = labeler.principles_for(c)[0]
        for order, (a, b), got in (("ab", (c.answer_a, c.answer_b), r["p_first_ab"][0]),
                                   ("ba", (c.answer_b, c.answer_a), r["p_first_ba"][0])):
            prompt = fp.build_cot_prompt(c.conversation, principle.text, a, b, style="hh")
            assert prompt.endswith("\n\nAssistant: Let's think step-by-step:")
            ids = encode_text(tiny.tokenizer, prompt)
            [sample] = sampler.generate(tiny.params, [ids], SamplingParams(
                temperature=1.0, top_p=0.95, max_new_tokens=8, stop_strings=fp.cot_stop_strings("hh")),
                seed=7, example_ids=[f"{c.id}/0/{order}"])
            assert r["cot"][0][order] == sample.text.strip()
            exact = _exact_p_first(tiny, ids + encode_text(tiny.tokenizer, fp.cot_answer_suffix(sample.text)))
            raw.append(exact)
            assert abs(got - min(max(exact, 0.4), 0.6)) < 2e-5
        assert 0.4 <= r["p_a"] <= 0.6
    assert min(raw) < 0.4 or max(raw) > 0.6  # the clamp did something


# ------------------------------------------------------------ pointwise

def _exact_pointwise_score(model: LoadedModel, ids, length=512):
    """Independent (see _exact_option_logps): (log p(No) - log p(Yes), p(Yes) + p(No))."""
    logp_yes, logp_no = _exact_option_logps(model, ids, fp.POINTWISE_OPTIONS, length)
    return logp_no - logp_yes, np.exp(logp_no) + np.exp(logp_yes)


@pytest.fixture(scope="module")
def pointwise(tiny, constitution):
    return fb.PointwiseLabeler(tiny, constitution, style="hh", num_principles=2, num_exemplars=2, seed=5,
                               batch_size=4, max_len=512, min_bucket=128, mesh=shd.make_mesh({"data": -1}))


def test_pointwise_label_formula_by_hand():
    # Scores per principle: a (1.0, -0.2) -> mean 0.4; b (-1.0, 0.6) -> mean -0.2; gap 0.6.
    assert abs(fb.pointwise_p_a([1.0, -0.2], [-1.0, 0.6]) - 1.0 / (1.0 + np.exp(-0.6))) < 1e-12
    assert abs(fb.pointwise_p_a([3.0], [3.0]) - 0.5) < 1e-15
    assert fb.pointwise_p_a([2000.0], [-2000.0]) == 1.0  # no overflow for huge gaps
    np.testing.assert_allclose(fb.sigmoid([-3.0, 0.0, 3.0]), 1.0 / (1.0 + np.exp([3.0, 0.0, -3.0])), atol=1e-15)


def test_pointwise_labels_are_exact_and_carry_their_fields(pointwise, tiny, constitution):
    records = pointwise.label(COMPARISONS)
    shots = fp.pointwise_shots(constitution.feedback_exemplars, 2)
    assert [s.verdict for s in shots] == ["No", "Yes"]
    seen = []
    for c, r in zip(COMPARISONS, records):
        # The same principles multiple choice draws for this comparison.
        assert r["principle_ids"] == [p.id for p in pointwise.principles_for(c)]
        assert r["source"] == "pointwise" and r["truncated"] == 0 and "p_first_ab" not in r
        scores, masses = {"a": [], "b": []}, []
        for principle in pointwise.principles_for(c):
            for slot, answer in (("a", c.answer_a), ("b", c.answer_b)):
                text = fp.build_pointwise_prompt(c.conversation, principle.text, answer, shots=shots, style="hh")
                assert text.endswith(f"Assistant: {answer}\n\nReviewers compare replies by asking: "
                                         f"\"{fp.principle_as_standard(principle.text)}\"\n{fp.POINTWISE_ASK}\n"
                                         "The answer is:")
                score, mass = _exact_pointwise_score(tiny, encode_text(tiny.tokenizer, text))
                scores[slot].append(score)
                masses.append(mass)
        np.testing.assert_allclose(r["score_a_per_principle"], scores["a"], atol=1e-4)
        np.testing.assert_allclose(r["score_b_per_principle"], scores["b"], atol=1e-4)
        np.testing.assert_allclose([r["score_a"], r["score_b"]], [np.mean(scores["a"]), np.mean(scores["b"])],
                                   atol=1e-4)
        gap = np.mean(scores["a"]) - np.mean(scores["b"])
        np.testing.assert_allclose(r["p_a"], 1.0 / (1.0 + np.exp(-gap)), atol=2e-5)
        np.testing.assert_allclose(r["p_a_per_principle"],
                                   1.0 / (1.0 + np.exp(-(np.subtract(scores["a"], scores["b"])))), atol=2e-5)
        np.testing.assert_allclose(r["option_mass"], np.mean(masses), rtol=1e-4)
        seen += scores["a"] + scores["b"]
    # The tiny model's answer gaps are small (p_a near 0.5), but its scores vary
    # across prompts 100x beyond the 1e-4 tolerance, so the checks above have teeth.
    assert np.ptp(seen) > 0.01


def test_pointwise_swap_gives_one_minus_p(pointwise):
    swapped = [fb.FeedbackComparison(c.id, c.kind, c.conversation, c.answer_b, c.answer_a) for c in COMPARISONS]
    for f, b in zip(pointwise.label(COMPARISONS), pointwise.label(swapped)):
        assert abs(f["p_a"] + b["p_a"] - 1.0) < 1e-5
        np.testing.assert_allclose(f["score_a_per_principle"], b["score_b_per_principle"], atol=1e-5)


def test_pointwise_with_a_fake_judge_by_hand(pointwise, monkeypatch):
    """A judge that reads the answer back from the prompt and says No (good)
    with logit 1.5 when it contains "good", and puts 0.8 of its mass on the options."""
    def option_logprobs(prompts, progress=False, **_):
        out = []
        for ids in prompts:
            text = pointwise.tokenizer.decode(ids)
            answer = text[text.rindex("\n\nAssistant: ") + 13:].split("\n\nReviewers")[0]
            logit = 1.5 if "good" in answer else -1.5
            p_no = 1.0 / (1.0 + np.exp(-logit))
            out.append([np.log(0.8 * (1 - p_no)), np.log(0.8 * p_no)])
        return np.asarray(out)

    monkeypatch.setattr(pointwise.scorer, "option_logprobs", option_logprobs)
    [r] = pointwise.label([fb.FeedbackComparison("x", "harmless", (user("Q?"),), "a good answer", "a bad one")])
    assert r["score_a_per_principle"] == pytest.approx([1.5, 1.5]) and r["score_b_per_principle"] == pytest.approx([-1.5, -1.5])
    assert abs(r["p_a"] - 1.0 / (1.0 + np.exp(-3.0))) < 1e-12 and abs(r["option_mass"] - 0.8) < 1e-12
    s = fb.label_summary([r])
    assert s["option_mass"] == pytest.approx(0.8) and s["principle_agreement"] == 1.0
    assert "position_bias" not in s  # one answer per prompt: no slot to prefer


def test_pointwise_config_checks(tiny, constitution):
    section = fb.get_default_config()
    section.source = "pointwise"
    fb.check_section(section)
    section.chain_of_thought = True
    with pytest.raises(ValueError, match="chain_of_thought=True works with feedback.source='multiple_choice'"):
        fb.check_section(section)
    with pytest.raises(ValueError, match="multiple_choice' only"):
        fb.PointwiseLabeler(tiny, constitution, chain_of_thought=True)
    assert "pointwise" in fb.SOURCES


def test_pointwise_stage_end_to_end(tmp_path):
    from cai_jax import artifacts
    from cai_jax.pipeline import StageContext
    from cai_jax.sharding import mesh_from_config
    from cai_jax.tools.score_pairs import load_judge_config

    config = load_judge_config(None, ["feedback.source=pointwise", "feedback.model_source=init:tiny",
                                      "feedback.num_exemplars=1", "feedback.batch_size=4",
                                      "feedback.max_seq_len=512", "data.render=hh"])
    pairs = [{"id": f"p{i}", "kind": kind, "prompt": [{"role": "user", "content": q}],
              "answer_a": a, "answer_b": b}
             for i, (kind, q, a, b) in enumerate([("harmless", "How do I hotwire a car?", "I won't help.", "Cut the wires."),
                                                  ("helpful", "What is 2+2?", "4.", "Fish."),
                                                  ("harmless", "Insult me.", "No thanks.", "You fool.")])]
    artifacts.write_jsonl_atomic(str(tmp_path / "pairs.jsonl"), pairs)
    summary = fb.run_stage(StageContext(config, str(tmp_path), mesh_from_config(config), progress=False))
    labels = artifacts.read_jsonl(str(tmp_path / "labels.jsonl"))
    assert summary["source"] == "pointwise" and summary["labels"] == 3 and "position_bias" not in summary
    assert 0.0 < summary["option_mass"] <= 1.0
    labeler = fb.labeler_from_config(config, mesh=mesh_from_config(config))
    assert isinstance(labeler, fb.PointwiseLabeler)
    again = labeler.label(fb.comparisons_from_pairs(pairs))
    for label, pair, r in zip(labels, pairs, again):
        assert label["source"] == "pointwise" and label["answer_a"] == pair["answer_a"]
        assert len(label["score_a_per_principle"]) == 2 and abs(label["p_a"] - r["p_a"]) < 1e-6
