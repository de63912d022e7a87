"""The bundled SmolLM2-135M-Instruct: weights, tokenizer, chat template, sanity of the LM."""

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.models.transformer import Transformer
from cai_jax.training.lm_loss import token_logprobs

PARAGRAPH = ("The river rises in the hills to the north and flows slowly through farmland "
             "before it reaches the sea. In spring the water is high and the fields along its "
             "banks are often flooded, which makes the soil rich for the summer crops.")


def _greedy(model, params, ids, n):
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(t.shape[1])[None],
                                             jnp.ones(t.shape, bool))[0]["logits"][0, -1])
    ids = list(ids)
    for _ in range(n):
        ids.append(int(apply(params, jnp.asarray([ids])).argmax()))
    return ids


def test_greedy_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The capital of France is")["input_ids"]
    out = _greedy(Transformer(smollm2.config), smollm2.params, ids, 4)
    assert "Paris" in tok.decode(out[len(ids):])


def test_natural_text_is_far_more_likely_than_shuffled(smollm2):
    tok = smollm2.tokenizer
    words = PARAGRAPH.split()
    shuffled = " ".join(np.random.default_rng(0).permutation(words))

    def mean_loss(text):
        ids = jnp.asarray([tok(text)["input_ids"]])
        logp = token_logprobs(Transformer(smollm2.config), smollm2.params, ids, jnp.ones_like(ids))
        return float(-logp.mean())

    natural, mixed = mean_loss(PARAGRAPH), mean_loss(shuffled)
    # Measured here: about 3.6 nats natural vs 7.0 shuffled.
    assert natural < 4.5, (natural, mixed)
    assert mixed > natural + 2.0, (natural, mixed)


def test_tokenizer_round_trip_and_specials(smollm2):
    tok = smollm2.tokenizer
    for text in ["Hello, world!", "  leading spaces\tand tabs\n\nHuman: hi", "naïve café 東京 🙂"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.convert_ids_to_tokens(1) == "<|im_start|>"


def test_chat_template_matches_its_definition(smollm2):
    # Written out by hand from the template string in the GGUF metadata: a default
    # system turn when none is given, each turn as <|im_start|>role\ncontent<|im_end|>\n.
    tok = smollm2.tokenizer
    conv = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"}]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4.<|im_end|>\n"
                "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == expected
    with_system = [{"role": "system", "content": "Be brief."}] + conv[:1]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
