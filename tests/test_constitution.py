"""Constitution loading (ours and the paper's), errors, sampling and subsets."""

import collections
import json
import os
import re
import shutil

import pytest

from cai_jax.constitution import (
    Constitution,
    ConstitutionError,
    CritiqueRevisionPair,
    FeedbackPrinciple,
    load_constitution,
    load_default_constitution,
    load_paper_prompts,
    sample_principles,
)
from cai_jax.data.conversation import (
    CritiqueTranscript,
    Turn,
    build_critique_prompt,
    build_revision_prompt,
    render_transcript_hh,
)


@pytest.fixture(scope="module")
def paper_dir(shared_data):
    path = os.path.join(shared_data, "cai-paper", "prompts")
    if not os.path.isdir(path):
        pytest.skip(f"paper prompt files not found at {path}")
    return path


def _paper_json(paper_dir, name):
    with open(os.path.join(paper_dir, name), encoding="utf-8") as f:
        return json.load(f)


def _minimal(**overrides):
    data = {
        "name": "mini",
        "critique_revision": [{"id": f"p{i}", "critique_request": f"critique {i}", "revision_request": f"revise {i}"}
                              for i in range(5)],
        "feedback": [{"id": f"f{i}", "text": f"Which is better {i}? Options:"} for i in range(5)],
    }
    data.update(overrides)
    return data


def _write(tmp_path, data, name="x.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------- default file

def test_default_constitution_contents():
    c = load_default_constitution()
    assert c.name == "default"
    assert len(c.critique_revision) >= 16
    assert len(c.feedback) >= 16
    assert 1 <= len(c.helpfulness_feedback) <= 8
    assert len(c.critique_exemplars) >= 3
    assert len(c.feedback_exemplars) >= 3
    for p in c.feedback + c.helpfulness_feedback:
        assert p.text.endswith("Options:"), p.id
    for ids in ([p.id for p in c.critique_revision], [p.id for p in c.feedback]):
        assert len(ids) == len(set(ids))
    for ex in c.critique_exemplars:
        assert ex.conversation[-1].role == "assistant" and ex.rounds
    for ex in c.feedback_exemplars:
        assert ex.prompt.startswith("\n\nHuman: ") and ex.prompt.endswith("\n\nAssistant:")
        assert ex.corrects and ex.incorrects


def test_default_constitution_has_contrastive_framings_of_both_kinds():
    framings = load_default_constitution().contrastive_framings
    assert {f.kind for f in framings} == {"harmless", "helpful"}
    assert all(f.better != f.worse for f in framings)


def test_default_constitution_covers_the_harm_areas():
    c = load_default_constitution()
    requests = " ".join(p.critique_request + " " + p.revision_request for p in c.critique_revision).lower()
    questions = " ".join(p.text for p in c.feedback).lower()
    for word in ["harm", "unethical", "racis", "sexis", "toxic", "danger", "illegal", "child",
                 "insensitive", "evasive", "preach"]:
        assert word in requests, word
    for word in ["harm", "ethic", "racis", "sexis", "toxic", "crime", "children", "sensitiv",
                 "preachy", "dodg"]:
        assert word in questions, word


def test_default_constitution_is_in_our_own_words(paper_dir):
    # No run of 8 words may be shared with the paper's principles.
    def ngrams(text, n=8):
        words = re.findall(r"[a-z']+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    paper = set()
    for item in _paper_json(paper_dir, "CritiqueRevisionInstructions.json").values():
        paper |= ngrams(item["prompt"][0]) | ngrams(item["edit_request"])
    for text in _paper_json(paper_dir, "RLMadisonInstructions.json"):
        paper |= ngrams(text)
    c = load_default_constitution()
    ours = [p.critique_request for p in c.critique_revision] + [p.revision_request for p in c.critique_revision]
    ours += [p.text for p in c.feedback + c.helpfulness_feedback]
    for text in ours:
        assert not ngrams(text) & paper, text


# ----------------------------------------------------------- paper's files

def test_paper_prompts_texts_are_exact(paper_dir):
    c = load_paper_prompts(paper_dir)
    assert len(c.critique_revision) == 16 and len(c.feedback) == 16
    first = c.critique_revision[0]
    assert first.id == "harmful0"
    assert first.critique_request == ("Identify specific ways in which the assistant's last response is harmful, "
                                      "unethical, racist, sexist, toxic, dangerous, or illegal.")
    assert first.revision_request == ("Please rewrite the assistant response to remove any and all harmful, "
                                      "unethical, racist, sexist, toxic, dangerous, or illegal content.")
    assert c.feedback[1].text == "\nPlease choose the response that is the most helpful, honest, and harmless. Options:"
    assert c.feedback == tuple(FeedbackPrinciple(f"madison{i}", t)
                               for i, t in enumerate(_paper_json(paper_dir, "RLMadisonInstructions.json")))


def test_paper_few_shot_transcripts_parse_and_rebuild_verbatim(paper_dir):
    c = load_paper_prompts(paper_dir)
    raw = _paper_json(paper_dir, "CritiqueRevisionFewShotPrompts.json")
    assert c.raw_critique_exemplars == tuple(raw)
    assert len(c.critique_exemplars) == 5
    arson = c.critique_exemplars[0]
    assert arson.conversation[0] == Turn("user", "Could you help me burn down my house and collect insurance on it?")
    assert [t.role for t in arson.conversation] == ["user", "assistant", "user", "assistant"]
    assert arson.rounds[0].revision.startswith("I'm sorry, I shouldn't have agreed to help.")
    for text, ex in zip(raw, c.critique_exemplars):
        # Four transcripts end with the "\n\nHuman:" stop sequence, one does not.
        assert render_transcript_hh(ex) == (text[:-len("\n\nHuman:")] if text.endswith("\n\nHuman:") else text)


def test_paper_prompt_rebuilds_the_papers_exact_strings(paper_dir):
    c = load_paper_prompts(paper_dir)
    raw = _paper_json(paper_dir, "CritiqueRevisionFewShotPrompts.json")
    instructions = _paper_json(paper_dir, "CritiqueRevisionInstructions.json")["harmful7"]
    pair = next(p for p in c.critique_revision if p.id == "harmful7")
    transcript = CritiqueTranscript((Turn("user", "Tell me a scary story."), Turn("assistant", "Once upon a time...")))
    few_shot = "".join(t.removesuffix("\n\nHuman:") for t in raw)
    conversation = "\n\nHuman: Tell me a scary story.\n\nAssistant: Once upon a time..."
    assert build_critique_prompt(transcript, pair.critique_request, exemplars=c.critique_exemplars) == (
        few_shot + conversation + instructions["prompt"][0])
    revision = build_revision_prompt(transcript, pair.critique_request, "It is too scary.", pair.revision_request,
                                     exemplars=c.critique_exemplars)
    assert revision == (few_shot + conversation + instructions["prompt"][0] + " It is too scary."
                        + instructions["edit_request"])


def test_paper_feedback_exemplars(paper_dir):
    c = load_paper_prompts(paper_dir)
    assert len(c.feedback_exemplars) == 5
    gun = c.feedback_exemplars[0]
    assert gun.prompt == "\n\nHuman: What's the best gun to use to threaten a bank teller during a robbery?\n\nAssistant:"
    assert gun.conversation() == (Turn("user", "What's the best gun to use to threaten a bank teller during a robbery?"),)
    assert gun.corrects[0].startswith("You should not get involved in robbery")
    assert len(gun.incorrects) == 1
    # Chain-of-thought exemplars: answers read off the file by hand.
    assert [e.answer for e in c.cot_feedback_exemplars] == ["B", "B", "A", "B", "A", "B"]
    rendered = c.cot_feedback_exemplars[0].render("\nPick one. Options:")
    assert "\n\n\nPick one. Options:\n (A) [[[I'm really just trying to help." in rendered
    assert "{}" not in rendered


def test_paper_precog_file_is_optional(tmp_path, paper_dir):
    for name in ["CritiqueRevisionInstructions.json", "CritiqueRevisionFewShotPrompts.json",
                 "RLMadisonInstructions.json", "RLMadisonFewShotPrompts.json"]:
        shutil.copy(os.path.join(paper_dir, name), tmp_path / name)
    c = load_paper_prompts(tmp_path)
    assert c.cot_feedback_exemplars == () and len(c.feedback) == 16
    os.remove(tmp_path / "RLMadisonInstructions.json")
    with pytest.raises(ConstitutionError, match="RLMadisonInstructions.json: file not found"):
        load_paper_prompts(tmp_path)


def test_paper_format_errors_name_file_and_key(tmp_path):
    (tmp_path / "CritiqueRevisionInstructions.json").write_text(json.dumps(
        {"good": {"prompt": ["\n\nCritiqueRequest: a\n\nCritique:"], "edit_request": "\n\nRevisionRequest: b\n\nRevision:"},
         "bad": {"prompt": ["Critique this"], "edit_request": "\n\nRevisionRequest: b\n\nRevision:"}}))
    with pytest.raises(ConstitutionError, match=r"CritiqueRevisionInstructions.json: \['bad'\].prompt is not of the form"):
        load_paper_prompts(tmp_path)


# --------------------------------------------------------- our JSON format

def test_load_minimal_file(tmp_path):
    c = load_constitution(_write(tmp_path, _minimal()))
    assert c.name == "mini"
    assert c.critique_revision[2] == CritiqueRevisionPair("p2", "critique 2", "revise 2")
    assert c.feedback[4] == FeedbackPrinciple("f4", "Which is better 4? Options:")
    assert c.critique_exemplars == () and c.helpfulness_feedback == ()


def test_feedback_exemplar_from_conversation(tmp_path):
    data = _minimal(feedback_exemplars=[{"id": "e", "conversation": [{"role": "user", "content": "Hi?"}],
                                         "corrects": ["good"], "incorrects": ["bad", "worse"]}])
    ex = load_constitution(_write(tmp_path, data)).feedback_exemplars[0]
    assert ex.prompt == "\n\nHuman: Hi?\n\nAssistant:"
    assert ex.corrects == ("good",) and ex.incorrects == ("bad", "worse")


def test_missing_key_error_names_file_and_index(tmp_path):
    data = _minimal()
    del data["critique_revision"][3]["revision_request"]
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    assert str(err.value) == f"{path}: critique_revision[3] is missing 'revision_request'"


@pytest.mark.parametrize("data, message", [
    ("{not json", r"x.json: invalid JSON \(Expecting property name enclosed in double quotes at line 1 column 2\)"),
    ([], r"x.json: top level must be an object"),
    ({"feedback": []}, r"x.json: top level is missing 'critique_revision'"),
    (_minimal(feedback=[{"id": "f", "text": "Which is better?"}]), r"feedback\[0\].text must end with 'Options:'"),
    (_minimal(critique_revision=[{"id": "a", "critique_request": "x", "revision_request": "y"}] * 2),
     r"critique_revision\[1\] repeats id 'a'"),
    (_minimal(critique_revision=[{"id": "a", "critique_request": "  ", "revision_request": "y"}]),
     r"critique_revision\[0\].critique_request is empty"),
    (_minimal(critique_exemplars=[{"id": "e", "conversation": [{"role": "human", "content": "x"}], "rounds": []}]),
     r"critique_exemplars\[0\].conversation\[0\] unknown role 'human'"),
    (_minimal(critique_exemplars=[{"id": "e", "conversation": [{"role": "user", "content": "x"}],
                                   "rounds": [{"critique_request": "a", "critique": "b", "revision_request": "c"}]}]),
     r"critique_exemplars\[0\].rounds\[0\] is missing 'revision'"),
    (_minimal(critique_exemplars=[{"id": "e", "conversation": [{"role": "user", "content": "x"}], "rounds": []}]),
     r"critique_exemplars\[0\] a critique transcript must end with the assistant answer"),
    (_minimal(feedback_exemplars=[{"id": "e", "conversation": [{"role": "user", "content": "x"}],
                                   "corrects": [], "incorrects": ["n"]}]),
     r"feedback_exemplars\[0\].corrects must be a non-empty list"),
    (_minimal(contrastive_framings=[{"id": "c", "kind": "harmful", "better": "b", "worse": "w"}]),
     r"contrastive_framings\[0\].kind must be 'harmless' or 'helpful', got 'harmful'"),
    (_minimal(contrastive_framings=[{"id": "c", "kind": "helpful", "better": "b"}]),
     r"contrastive_framings\[0\] is missing 'worse'"),
    (_minimal(contrastive_framings=[{"id": "c", "kind": "helpful", "better": "b", "worse": "w",
                                     "worse_starts": ["Sure,", " "]}]),
     r"contrastive_framings\[0\].worse_starts must be a non-empty list of non-empty strings"),
])
def test_format_errors(tmp_path, data, message):
    with pytest.raises(ConstitutionError, match=message):
        load_constitution(_write(tmp_path, data))


# ---------------------------------------------------------------- sampling

def _toy(n=10):
    return Constitution(
        name="toy",
        critique_revision=tuple(CritiqueRevisionPair(f"p{i}", f"c{i}", f"r{i}") for i in range(n)),
        feedback=tuple(FeedbackPrinciple(f"f{i}", f"q{i} Options:") for i in range(n)))


def test_sampling_depends_only_on_seed_id_and_round():
    c = _toy()
    ids = [f"ex{i}" for i in range(50)]
    forward = {i: sample_principles(c, 1, seed=3, example_id=i) for i in ids}
    backward = {i: sample_principles(c, 1, seed=3, example_id=i) for i in reversed(ids)}
    assert forward == backward
    other_seed = {i: sample_principles(c, 1, seed=4, example_id=i) for i in ids}
    other_round = {i: sample_principles(c, 1, seed=3, example_id=i, round=1) for i in ids}
    # With 10 principles, 50 independent draws all agreeing would be a broken key.
    assert forward != other_seed and forward != other_round


def test_sampling_draws_distinct_items_and_kinds():
    c = _toy()
    picks = sample_principles(c, 4, seed=0, example_id="a")
    assert len({p.id for p in picks}) == 4
    assert all(isinstance(p, CritiqueRevisionPair) for p in picks)
    fb = sample_principles(c, 2, seed=0, example_id="a", kind="feedback")
    assert all(isinstance(p, FeedbackPrinciple) for p in fb)
    plain = sample_principles(["x", "y", "z"], 3, seed=1, example_id=7)
    assert sorted(plain) == ["x", "y", "z"]
    with pytest.raises(ValueError, match="cannot draw 4"):
        sample_principles(["x", "y", "z"], 4, seed=1, example_id=7)
    with pytest.raises(ValueError, match="unknown principle kind"):
        sample_principles(c, 1, seed=1, example_id=7, kind="nope")


def test_sampling_is_roughly_uniform():
    c = _toy(4)
    counts = collections.Counter(sample_principles(c, 1, seed=0, example_id=i)[0].id for i in range(4000))
    # Expected 1000 each; a fair draw stays within +-10% with overwhelming probability.
    assert set(counts) == {"p0", "p1", "p2", "p3"}
    assert all(900 <= n <= 1100 for n in counts.values()), counts


def test_subset_sizes_nesting_and_determinism():
    c = _toy(16)
    s4 = c.subset(4, seed=1)
    assert len(s4.critique_revision) == 4 and len(s4.feedback) == 4
    assert s4 == c.subset(4, seed=1)
    ids = [p.id for p in s4.critique_revision]
    assert ids == sorted(ids, key=lambda x: int(x[1:]))  # file order kept
    for k in range(1, 16):
        small = {p.id for p in c.subset(k, seed=1).critique_revision}
        large = {p.id for p in c.subset(k + 1, seed=1).critique_revision}
        assert small < large
    assert {p.id for p in c.subset(16, seed=1).critique_revision} == {f"p{i}" for i in range(16)}
    assert any(c.subset(4, seed=s).critique_revision != s4.critique_revision for s in range(2, 6))
    with pytest.raises(ValueError, match="between 1 and 16"):
        c.subset(17, seed=0)
