"""One answer layout for every stage (data/conversation.py): SFT trains on the
ids the preference model is trained on and scores, PPO samples after the same
prompt ids, and every stage cuts HH answers at the same stop strings."""
import numpy as np
import pytest

from cai_jax.data.conversation import (
    Turn,
    answer_stop_strings,
    build_initial_prompt,
    encode_answer,
    end_of_answer_ids,
)
from cai_jax import sharding as shd
from cai_jax.inference import preference_scorer as ps
from cai_jax.inference.sampling_buckets import cut_at_stops
from cai_jax.rl_cai import feedback_prompts as fp
from cai_jax.rl_cai import preference as pm
from cai_jax.rl_cai import rollout as ro
from cai_jax.sl_cai import sft
from cai_jax.weights.loader import load_model
from cai_jax.weights.tokenizer import encode_text

CONV = (Turn("system", "Be brief."), Turn("user", "Hi there"), Turn("assistant", "Yo"),
        Turn("user", "Tell me a joke."))
ANSWER = "Why did the chicken cross the road?"


@pytest.fixture(scope="module")
def tiny_pm():
    return load_model("init:tiny", ps.SCALAR_HEAD, seed=0, to_device=False)


def _scored_rows(scorer, conversations, answers, complete):
    """The rows PreferenceScorer.score hands to the model."""
    rows = []
    scorer.score_ids = lambda r: rows.extend(r) or np.zeros(len(r))
    scorer.score(conversations, answers, complete=complete)
    return [list(map(int, r)) for r in rows]


@pytest.mark.parametrize("style", ["chat", "hh"])
def test_training_and_scoring_encode_an_answer_to_the_same_ids(tiny_pm, style):
    tok = tiny_pm.tokenizer
    prompt_ids, answer_ids = encode_answer(tok, CONV, ANSWER, style)
    end = list(end_of_answer_ids(tok, style))
    assert end and answer_ids[-len(end):] == end

    # SFT: the loss covers the answer and its end token, after the same prompt.
    tokens, mask = sft.tokenize_example(CONV, ANSWER, tok, style)
    assert tokens.tolist() == prompt_ids + answer_ids
    assert mask.tolist() == [0] * len(prompt_ids) + [1] * len(answer_ids)

    # PPO samples after these prompt ids.
    [prompt] = ro.encode_prompts([ro.PolicyPrompt("p", "helpful", CONV)], style, tok, 1000)
    assert list(prompt.tokens) == prompt_ids

    # The PM is trained on the rows it scores, complete answers or not.
    scorer = ps.PreferenceScorer(tiny_pm, style=style, max_len=1000, mesh=shd.make_mesh({"data": -1}))
    for complete in (True, False):
        [trained] = pm.tokenize_pairs([{"id": "x", "conversation": CONV, "a": ANSWER, "b": "No.",
                                        "p_a": 1.0, "complete_a": complete}], tok, style, 1000)[0]
        [scored] = _scored_rows(scorer, [CONV], [ANSWER], complete)
        assert trained["a"].tolist() == scored
        # ...and they are SFT's ids: a chat PM reads a complete answer at its
        # end-of-turn token; an HH PM reads every answer at its text (see
        # preference_row), so only SFT's EOS is missing.
        ended = complete and style == "chat"
        assert scored == prompt_ids + (answer_ids if ended else answer_ids[:-len(end)])


def test_the_hh_answer_follows_the_generation_prompt_after_a_space(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt_ids, answer_ids = encode_answer(tok, CONV[1:], "Sure.", "hh", end=False)
    assert prompt_ids == encode_text(tok, "\n\nHuman: Hi there\n\nAssistant: Yo\n\nHuman: Tell me a joke."
                                          "\n\nAssistant:")
    assert answer_ids == encode_text(tok, " Sure.")
    assert end_of_answer_ids(tok, "hh") == (tok.eos_token_id,)
    assert end_of_answer_ids(tok, "chat") == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert build_initial_prompt(CONV[1:], style="hh") == tok.decode(prompt_ids)


def test_every_stage_cuts_an_hh_answer_at_either_speaker_label():
    stops = answer_stop_strings("hh")
    for label in ("Human:", "Assistant:"):
        assert cut_at_stops(f" Sure thing.\n\n{label} and more", stops) == " Sure thing."
    # Chain-of-thought reasoning is an answer too, ended early by its answer cue.
    assert fp.cot_stop_strings("hh") == (fp.COT_ANSWER_CUE,) + stops
    assert fp.cot_stop_strings("chat") == (fp.COT_ANSWER_CUE,)


def test_an_unknown_style_is_refused_everywhere(smollm2_tokenizer):
    for call in (lambda: encode_answer(smollm2_tokenizer, CONV, ANSWER, "text"),
                 lambda: build_initial_prompt(CONV, style="text", tokenizer=smollm2_tokenizer),
                 lambda: fp.build_choice_prompt(CONV, "Which is better? Options:", "a", "b", style="text")):
        with pytest.raises(ValueError, match=r"render style must be one of \('hh', 'chat'\), got 'text'"):
            call()
