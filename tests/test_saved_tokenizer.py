"""SavedTokenizer (tokenizers + jinja2, no transformers) against transformers'
tokenizer reading the same folder: ids, decoding, special tokens, vocabulary
and chat templates of the packaged models' tokenizers."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_gguf_tokenizer import TEXTS, _conversations, _gguf_path

from cai_jax.weights import saved_tokenizer, tokenizer as tok_lib
from cai_jax.weights.saved_tokenizer import SavedTokenizer

MODELS = ("smollm2", "qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="module", params=MODELS)
def pair(request, tmp_path_factory):
    """(ours, transformers') on the folder the GGUF's tokenizer is saved to."""
    from transformers import AutoTokenizer

    path = _gguf_path(request.param)
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CAI_JAX_CACHE", str(cache))
    try:
        ours = tok_lib.tokenizer_from_gguf.__wrapped__(path)
    finally:
        mp.undo()
    assert isinstance(ours, SavedTokenizer)
    return ours, AutoTokenizer.from_pretrained(ours.directory)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_equal_transformers(pair, add_special_tokens):
    ours, ref = pair
    for text in TEXTS:
        want = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours(text, add_special_tokens=add_special_tokens)["input_ids"] == want, repr(text)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == want


def test_decode_equals_transformers(pair):
    ours, ref = pair
    for text in TEXTS[::3]:
        ids = ref(text, add_special_tokens=False)["input_ids"] + [ref.eos_token_id]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.batch_decode([[1, 2], [3]]) == ref.batch_decode([[1, 2], [3]])
    assert ours.decode(5) == ref.decode(5)


def test_special_tokens_and_vocabulary_equal(pair):
    ours, ref = pair
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "special_tokens_map", "chat_template", "padding_side"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "Hello", "not-a-token-anywhere"):
        assert ours.convert_tokens_to_ids(token) == ref.convert_tokens_to_ids(token), token
    assert ours.convert_tokens_to_ids(["a", "<|im_end|>"]) == ref.convert_tokens_to_ids(["a", "<|im_end|>"])
    assert ours.convert_ids_to_tokens([0, 17, 1000]) == ref.convert_ids_to_tokens([0, 17, 1000])
    assert ours.convert_ids_to_tokens(42) == ref.convert_ids_to_tokens(42)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_equals_transformers(pair, add_generation_prompt):
    ours, ref = pair
    kw = dict(add_generation_prompt=add_generation_prompt)
    for messages in _conversations() + [[{"role": "user", "content": "hi", "name": None}]]:
        assert ours.apply_chat_template(messages, tokenize=False, **kw) == \
            ref.apply_chat_template(messages, tokenize=False, **kw)
        assert ours.apply_chat_template(messages, return_dict=False, **kw) == \
            list(ref.apply_chat_template(messages, return_dict=False, **kw))
        assert ours.apply_chat_template(messages, **kw)["input_ids"] == \
            list(ref.apply_chat_template(messages, **kw)["input_ids"])


def test_save_pretrained_is_read_alike_by_both(pair, tmp_path):
    from transformers import AutoTokenizer

    ours, _ = pair
    ours.save_pretrained(str(tmp_path / "copy"))
    again, ref = SavedTokenizer(str(tmp_path / "copy")), AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    messages = _conversations()[-1]
    for tok in (again, ref):
        assert tok.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages, tokenize=False)
        assert tok(TEXTS[-1], add_special_tokens=False)["input_ids"] == ours.encode(TEXTS[-1], False)


def test_other_folders_go_to_transformers(pair, tmp_path):
    ours, _ = pair
    folder = tmp_path / "odd"
    ours.save_pretrained(str(folder))
    config = json.loads((folder / saved_tokenizer.CONFIG_FILE).read_text())
    for change in ({"tokenizer_class": "Qwen2Tokenizer"}, {"clean_up_tokenization_spaces": True},
                   {"add_bos_token": True}):
        (folder / saved_tokenizer.CONFIG_FILE).write_text(json.dumps(dict(config, **change)))
        assert not saved_tokenizer.readable(str(folder)), change
        with pytest.raises(ValueError, match="not a plain tokenizer folder"):
            SavedTokenizer(str(folder))
        assert not isinstance(tok_lib.tokenizer_from_dir.__wrapped__(str(folder)), SavedTokenizer)
    assert not saved_tokenizer.readable(str(tmp_path))  # no tokenizer.json at all


def test_padding_side_follows_the_config(pair, tmp_path):
    from transformers import AutoTokenizer

    ours, _ = pair
    folder = tmp_path / "left"
    ours.save_pretrained(str(folder))
    config = json.loads((folder / saved_tokenizer.CONFIG_FILE).read_text())
    (folder / saved_tokenizer.CONFIG_FILE).write_text(json.dumps(dict(config, padding_side="left")))
    assert SavedTokenizer(str(folder)).padding_side == AutoTokenizer.from_pretrained(str(folder)).padding_side == "left"


def test_a_warm_start_does_not_import_transformers(tmp_path):
    """The second load of the packaged model reads its tokenizer without
    transformers (about 0.9 s of every process, issue #20)."""
    path = _gguf_path("smollm2")
    script = textwrap.dedent(f"""
        import sys
        from cai_jax.weights.tokenizer import tokenizer_from_gguf
        tok = tokenizer_from_gguf.__wrapped__({path!r})
        print(type(tok).__name__, "transformers" in sys.modules)
    """)
    env = dict(os.environ, CAI_JAX_CACHE=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for out in runs:
        assert out.returncode == 0, out.stderr[-2000:]
    assert runs[0].stdout.split() == ["SavedTokenizer", "True"]  # built by transformers, then saved
    assert runs[1].stdout.split() == ["SavedTokenizer", "False"]
