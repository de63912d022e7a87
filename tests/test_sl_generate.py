"""SL-CAI generation: clean-up of sampled text, the revision loop, resume."""
import pytest

from cai_jax.sl_cai import cleanup

RR = "Rewrite the reply so that it does not assist with anything illegal."
CR = "Explain whether the assistant's last reply helps the human break the law."


# ------------------------------------------------------------------ clean-up

@pytest.mark.parametrize("raw, expected", [
    # The HH model runs on into the next section: cut there.
    (" The reply explains how to steal.\n\nRevisionRequest: Rewrite it.\n\nRevision: No.",
     "The reply explains how to steal."),
    (" I can't help with that.\n\nHuman: why not?", "I can't help with that."),
    ("I can't help.\nHuman: ok", "I can't help."),
    # Request labels are never part of an answer, even mid-line.
    ("Fine. CritiqueRequest: more", "Fine."),
    # Labels repeated at the start are scaffolding, not content.
    ("Revision: I won't help with that.", "I won't help with that."),
    ("  Critique: Revision: The answer is harmful.", "The answer is harmful."),
    ("Revised response: Please talk to someone you trust.", "Please talk to someone you trust."),
    # A label later in the text starts a new section; one inside a sentence does not.
    ("Better answer.\n\nCritique: still bad", "Better answer."),
    ("Better answer.\n\nRewrite: again", "Better answer."),
    ("My critique: it was rude.", "My critique: it was rude."),
    # Announcements and quotes around the whole answer are not part of it.
    ("Here's a revised version of the response: I can't help with that.", "I can't help with that."),
    ("Sure! Here is the rewritten reply:\n\n\"Please stay safe.\"", "Please stay safe."),
    ('"Stay safe," she said. "Really."', '"Stay safe," she said. "Really."'),
    # Chat special tokens end the text.
    ("Sure thing.<|im_end|>\n<|im_start|>user\nmore", "Sure thing."),
])
def test_clean_text_cuts_and_strips_scaffolding(raw, expected):
    assert cleanup.clean_text(raw) == expected


def test_extra_stop_strings_cut_too():
    assert cleanup.clean_text("one END two", extra_stops=["END"]) == "one"


def test_revision_kept_when_it_is_a_real_answer():
    c = cleanup.clean_revision(" I can't help with taking the bike, but you could tell the manager.\n\n"
                               "CritiqueRequest: again", RR, CR, "The reply helps with theft.")
    assert c == cleanup.Cleaned("I can't help with taking the bike, but you could tell the manager.", None)


@pytest.mark.parametrize("raw, reason", [
    ("", "empty"),
    ("   \n\n ", "empty"),
    ("...!?", "empty"),
    ("\n\nHuman: tell me more", "empty"),  # nothing before the next turn
    ("I'm sorry.\nI'm sorry.\nI'm sorry.\n", "repeated_lines"),
    ("a b c\nd e f\na b c\nd e f\n", "repeated_lines"),
    ("I cannot do that " * 10, "repetition"),
    (RR, "echo_request"),
    ("Rewrite the reply so that it does not assist with anything illegal", "echo_request"),
    (CR + " Yes.", "echo_request"),
    ("The reply helps with theft.", "echo_critique"),
    # The same sentence three times, with other text between.
    ("Be kind to him. Talk it through. Be kind to him. Breathe. Be kind to him!", "repetition"),
    # Writing about the reply instead of writing a new one.
    ("The response is a genuine suggestion that may help.", "commentary"),
    ("This assistant's reply avoids the question.", "commentary"),
    ("Your answer will contain a hint.", "commentary"),
])
def test_degenerate_revisions_are_dropped_with_a_reason(raw, reason):
    assert cleanup.clean_revision(raw, RR, CR, "The reply helps with theft.").dropped == reason


def test_revision_opening_with_the_critique_is_an_echo():
    critique = ("The line you quote is emotional manipulation, a real and pervasive problem at work. "
                "It uses personal tactics to push others into things that hurt them.")
    copied = ("The line you quote is emotional manipulation, a real and pervasive problem at work. "
              "Here is something else entirely, written at length so the copy is a small part.")
    assert cleanup.clean_revision(copied, RR, CR, critique).dropped == "echo_critique"
    fresh = "I won't help with that, but talking to your manager about the pressure could help."
    assert cleanup.clean_revision(fresh, RR, CR, critique).dropped is None


def test_copies_of_the_shown_exemplar_are_dropped():
    # Seen in the default run: a 0.5B chat model answered the meth prompt with
    # the coworker exemplar's revision word for word.
    from cai_jax.constitution import load_default_constitution
    from cai_jax.sl_cai.generate import exemplar_texts

    shown = load_default_constitution().critique_exemplars[1:2]
    texts = exemplar_texts(shown)
    assert texts == [shown[0].rounds[0].critique, shown[0].rounds[0].revision]
    copy = shown[0].rounds[0].revision
    assert cleanup.clean_revision(copy, RR, CR, "The reply helps.", exemplar_texts=texts).dropped == "echo_exemplar"
    assert cleanup.clean_critique(shown[0].rounds[0].critique, CR, exemplar_texts=texts).dropped == "echo_exemplar"
    own = "I'm sorry, but I can't help with making drugs; if you are struggling, a doctor can help."
    assert cleanup.clean_revision(own, RR, CR, "The reply helps.", exemplar_texts=texts).dropped is None


def test_critique_echo_and_answer_checks():
    assert cleanup.clean_critique(CR, CR).dropped == "echo_request"
    assert cleanup.clean_critique(" The reply helps the human steal.", CR) == cleanup.Cleaned(
        "The reply helps the human steal.", None)
    assert cleanup.clean_answer("Sure!\n\nHuman: thanks").text == "Sure!"
    assert cleanup.clean_answer("").dropped == "empty"


def test_repetition_thresholds_by_hand():
    # 30 distinct words: every 4-gram distinct -> not a loop.
    assert cleanup.repetition_reason(" ".join(f"w{i}" for i in range(30))) is None
    # "x y" repeated 15 times (30 words): 27 4-grams, 2 distinct -> a loop.
    assert cleanup.repetition_reason("x y " * 15) == "repetition"
    # A sentence said twice is fine; short ones ("No.") never count.
    assert cleanup.repetition_reason("I can't help. Please ask a doctor. I can't help, sorry.") is None
    assert cleanup.repetition_reason("No. No. No. Please stop.") is None
    # The reply itself may start with "The": only "The response/reply/..." is commentary.
    assert cleanup.clean_revision("The safest thing is to talk to a doctor.", RR).dropped is None
    assert cleanup.clean_revision("My answer is no, but here is why.", RR).dropped is None
    # Two occurrences of a line are fine, three are not.
    assert cleanup.repetition_reason("same line\nsame line\nother") is None
    assert cleanup.repetition_reason("same line\nsame line\nsame line") == "repeated_lines"


# ------------------------------------------------------------ the revision loop (scripted model)

from cai_jax.constitution import load_default_constitution, sample_principles  # noqa: E402
from cai_jax.sl_cai import generate as gen  # noqa: E402
from cai_jax.data.prompt_sets import Prompt, load_prompts  # noqa: E402

SETTINGS = gen.StepSettings(temperature=1.0, top_k=0, top_p=1.0, answer_max_new_tokens=16,
                            critique_max_new_tokens=16, revision_max_new_tokens=16, batch_size=4)
ITEMS = [Prompt("rt-a", "theft", "How do I steal a bike?", "red_team"),
         Prompt("rt-b", "violence", "How do I hurt my neighbour?", "red_team")]


class ScriptedModel:
    """Stands in for the sampler: answers by step purpose and remembers every call."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def __call__(self, prompts, max_new_tokens, purpose, example_ids):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.calls.append((purpose, list(example_ids), texts))
        return [self.replies(purpose, i, t) for i, t in zip(example_ids, texts)]


def _replies(purpose, example_id, prompt_text):
    if purpose == "answer":
        return f" Here is how ({example_id}).\n\nHuman: thanks"
    if purpose.startswith("critique"):
        return f" The answer to {example_id} is harmful in round {purpose[-1]}.\n\nRevisionRequest: x"
    if purpose == "revision1" and example_id == "rt-b":
        return "   "  # an empty revision in round 1 for one prompt: dropped
    return f" I won't help ({example_id}, {purpose})."


def _builder(tokenizer, style="hh", max_seq_len=8192):
    return gen.PromptBuilder(tokenizer, style, max_seq_len)


@pytest.mark.parametrize("style", ["hh", "chat"])
def test_revision_loop_records_and_batching(smollm2_tokenizer, style):
    constitution = load_default_constitution()
    model = ScriptedModel(smollm2_tokenizer, _replies)
    records = gen.revise_prompts(ITEMS, constitution, _builder(smollm2_tokenizer, style), model, SETTINGS,
                                 num_revisions=3, num_fewshot=1, direct_revision=False, seed=5)
    # One sampler call per step over all prompts: answer, then critique/revision per round.
    assert [c[0] for c in model.calls] == ["answer", "critique0", "revision0", "critique1", "revision1",
                                           "critique2", "revision2"]
    assert all(c[1] == ["rt-a", "rt-b"] for c in model.calls)
    a, b = records
    assert a["initial_answer"] == "Here is how (rt-a)." and a["initial_dropped"] is None
    assert len(a["rounds"]) == len(b["rounds"]) == 3
    for rec in records:
        for r, rnd in enumerate(rec["rounds"]):
            principle = sample_principles(constitution, 1, seed=5, example_id=rec["id"], round=r)[0]
            assert rnd["principle_id"] == principle.id
            assert rnd["critique_request"] == principle.critique_request
            assert rnd["revision_request"] == principle.revision_request
            assert rnd["critique"] == f"The answer to {rec['id']} is harmful in round {r}."
    assert [r["dropped"] for r in b["rounds"]] == [None, "empty", None]
    assert a["final_answer"] == "I won't help (rt-a, revision2)."
    assert b["final_answer"] == "I won't help (rt-b, revision2)."
    # Round 2 of rt-b builds on round 0's revision; the dropped round 1 is not shown.
    critique2_b = model.calls[5][2][1]
    assert "I won't help (rt-b, revision0)." in critique2_b
    assert "revision1" not in critique2_b
    # The initial answer was cut at the stop ("Human: thanks" is not in the transcript).
    assert "thanks" not in critique2_b
    # The exemplar leads the prompt.
    exemplar = sample_principles(constitution.critique_exemplars, 1, seed=5, example_id="rt-b",
                                 kind="critique_exemplars")[0]
    first = exemplar.conversation[0].content
    assert first in critique2_b and critique2_b.index(first) < critique2_b.index(ITEMS[1].text)


def test_dropped_revision_keeps_the_previous_answer(smollm2_tokenizer):
    def replies(purpose, example_id, text):
        if purpose == "answer":
            return "Initial."
        if purpose.startswith("critique"):
            return "It is harmful."
        return "Revised once." if purpose == "revision0" else "Revised once.\nRevised once.\nRevised once."
    records = gen.revise_prompts(ITEMS[:1], load_default_constitution(), _builder(smollm2_tokenizer),
                                 ScriptedModel(smollm2_tokenizer, replies), SETTINGS,
                                 num_revisions=2, num_fewshot=0, direct_revision=False, seed=0)
    assert [r["dropped"] for r in records[0]["rounds"]] == [None, "repeated_lines"]
    assert records[0]["final_answer"] == "Revised once."


def test_bad_critique_drops_the_round_without_a_revision(smollm2_tokenizer):
    def replies(purpose, example_id, text):
        return {"answer": "Initial.", "critique0": "", "critique1": "Harmful."}.get(purpose, "Fixed.")
    model = ScriptedModel(smollm2_tokenizer, replies)
    records = gen.revise_prompts(ITEMS[:1], load_default_constitution(), _builder(smollm2_tokenizer), model,
                                 SETTINGS, num_revisions=2, num_fewshot=0, direct_revision=False, seed=0)
    rounds = records[0]["rounds"]
    assert rounds[0]["dropped"] == "critique_empty" and rounds[0]["revision"] is None
    assert rounds[1]["dropped"] is None and records[0]["final_answer"] == "Fixed."
    # No revision was asked for in round 0.
    assert [c[0] for c in model.calls] == ["answer", "critique0", "critique1", "revision1"]


def test_direct_revision_asks_for_no_critique(smollm2_tokenizer):
    model = ScriptedModel(smollm2_tokenizer, _replies)
    records = gen.revise_prompts(ITEMS, load_default_constitution(), _builder(smollm2_tokenizer), model,
                                 SETTINGS, num_revisions=2, num_fewshot=2, direct_revision=True, seed=1)
    assert [c[0] for c in model.calls] == ["answer", "revision0", "revision1"]
    for rnd in records[0]["rounds"]:
        assert rnd["critique_request"] is None and rnd["critique"] is None
    # Neither the exemplars nor earlier rounds show critiques.
    assert all("CritiqueRequest:" not in text for c in model.calls for text in c[2])
    assert "RevisionRequest:" in model.calls[2][2][0]


def test_prompts_that_do_not_fit_lose_exemplars_then_the_round(smollm2_tokenizer):
    model = ScriptedModel(smollm2_tokenizer, _replies)
    tok = smollm2_tokenizer
    # Room for the bare critique prompt of round 0 but not with an exemplar.
    bare = gen.PromptBuilder(tok, "hh", 10_000).fit(
        lambda shots: gen.build_critique_prompt(
            gen.CritiqueTranscript((gen.Turn("user", ITEMS[0].text), gen.Turn("assistant", "Here is how (rt-a).")),),
            sample_principles(load_default_constitution(), 1, seed=0, example_id="rt-a")[0].critique_request,
            exemplars=shots, style="hh"),
        (), 0)
    limit = len(bare) + SETTINGS.critique_max_new_tokens
    records = gen.revise_prompts(ITEMS[:1], load_default_constitution(), _builder(tok, "hh", limit), model,
                                 SETTINGS, num_revisions=1, num_fewshot=2, direct_revision=False, seed=0)
    critique_prompt = model.calls[1][2][0]
    assert critique_prompt.startswith("\n\nHuman: " + ITEMS[0].text)  # no exemplar left in front
    # The revision prompt is longer still: that round is dropped as too long.
    assert records[0]["rounds"][0]["dropped"] == "too_long"
    assert records[0]["final_answer"] == records[0]["initial_answer"]


def test_principles_depend_on_the_seed_only(smollm2_tokenizer):
    def ids(seed, items):
        records = gen.revise_prompts(items, load_default_constitution(), _builder(smollm2_tokenizer),
                                     ScriptedModel(smollm2_tokenizer, _replies), SETTINGS, num_revisions=4,
                                     num_fewshot=0, direct_revision=False, seed=seed)
        return {rec["id"]: [r["principle_id"] for r in rec["rounds"]] for rec in records}
    assert ids(3, ITEMS) == ids(3, ITEMS[::-1])  # batch order does not matter
    assert ids(3, ITEMS) != ids(4, ITEMS)


# ------------------------------------------------------------ the stage on the tiny model

import os  # noqa: E402

from cai_jax import artifacts  # noqa: E402
from cai_jax.config import load_config_module  # noqa: E402
from cai_jax.pipeline import StageContext  # noqa: E402
from cai_jax.sharding import mesh_from_config  # noqa: E402

base_config = load_config_module(
    os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")).base_config


def tiny_config(num_revisions=2, seed=0):
    config = base_config()
    config.seed = seed
    config.model.name, config.model.source = "tiny", "init:tiny"
    # Chunks of two everywhere: one batch shape per step for the sampler to compile.
    config.data.red_team_limit, config.data.helpful_limit = 6, 2
    config.sampling.max_new_tokens, config.sampling.batch_size = 6, 4
    config.sl_generate = gen.get_default_config()
    # The stage's own limit cuts the run's pool further (6 -> 4).
    config.sl_generate.red_team_limit = 4
    config.sl_generate.num_revisions = num_revisions
    # No exemplars: shorter prompts, fewer shapes for the sampler to compile
    # (the scripted tests above cover exemplars).
    config.sl_generate.num_fewshot = 0
    config.sl_generate.prompts_per_chunk = 2
    return config


class CountingSampler:
    """Wraps the real Sampler class to record which examples were generated."""
    calls = []

    @classmethod
    def install(cls, monkeypatch):
        import cai_jax.inference.sampling as sampling
        real = sampling.Sampler
        cls.calls = []

        class Recording(real):
            def generate(self, params, prompts, *args, **kwargs):
                cls.calls.append(list(kwargs.get("example_ids") or []))
                return super().generate(params, prompts, *args, **kwargs)

        monkeypatch.setattr(sampling, "Sampler", Recording)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_stage_on_tiny_model_writes_records_and_resumes(tmp_path, monkeypatch, shared_prefix):
    CountingSampler.install(monkeypatch)
    config = tiny_config()
    config.sampling.shared_prefix = shared_prefix
    summary = gen.run_stage(StageContext(config, str(tmp_path / "a"), mesh_from_config(config), progress=False))
    records = artifacts.read_jsonl(str(tmp_path / "a" / "sl_data.jsonl"))
    helpful = artifacts.read_jsonl(str(tmp_path / "a" / "helpful_data.jsonl"))
    prompts = load_prompts(config.data, "red_team", "train")[:4]
    assert [r["id"] for r in records] == [p.id for p in prompts] and len(records) == 4
    assert [r["id"] for r in helpful] == [p.id for p in load_prompts(config.data, "helpful", "train")]
    constitution = load_default_constitution()
    for rec, item in zip(records, prompts):
        assert set(rec) == {"id", "category", "prompt", "initial_answer", "initial_dropped", "rounds",
                            "final_answer", "sampling"}
        assert rec["prompt"] == item.text and rec["category"] == item.category
        assert len(rec["rounds"]) == 2
        assert [r["principle_id"] for r in rec["rounds"]] == [
            sample_principles(constitution, 1, seed=0, example_id=item.id, round=r)[0].id for r in range(2)]
        kept = [r["revision"] for r in rec["rounds"] if r["dropped"] is None]
        assert rec["final_answer"] == (kept[-1] if kept else rec["initial_answer"])
        assert rec["sampling"]["seed"] == 0 and rec["sampling"]["render"] == "chat"
        assert rec["sampling"]["revision_max_new_tokens"] == 6
    assert summary["prompts"] == 4 and summary["rounds"] == 8
    assert summary["dropped_revisions"] == sum(r["dropped"] is not None for rec in records for r in rec["rounds"])
    assert summary["helpful_prompts"] == 2
    assert not os.path.exists(tmp_path / "a" / "sl_data.jsonl.partial")

    # A run killed after its first chunk: the .partial holds the first two prompts.
    workdir = tmp_path / "b"
    os.makedirs(workdir)
    done = [dict(r, final_answer="FROM THE KILLED RUN") for r in records[:2]]
    artifacts.write_jsonl_atomic(str(workdir / "sl_data.jsonl.partial"), done)
    CountingSampler.calls = []
    gen.run_stage(StageContext(config, str(workdir), mesh_from_config(config), progress=False))
    resumed = artifacts.read_jsonl(str(workdir / "sl_data.jsonl"))
    assert [r["id"] for r in resumed] == [r["id"] for r in records]
    assert [r["final_answer"] for r in resumed[:2]] == ["FROM THE KILLED RUN"] * 2
    red_team_calls = [ids for ids in CountingSampler.calls if set(ids) <= {p.id for p in prompts}]
    assert red_team_calls and all(ids == [prompts[2].id, prompts[3].id] for ids in red_team_calls)
    # The resumed prompts are sampled with the same per-example seeds as before.
    assert resumed[2:] == records[2:]
