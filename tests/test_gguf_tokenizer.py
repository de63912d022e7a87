"""The tokenizer built from GGUF metadata (no torch) against transformers' own GGUF tokenizer."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cai_jax.weights import gguf_tokenizer
from cai_jax.weights.packaged import PackagedModelError, packaged_gguf_path

# Qwen 1.5B's tokenizer is the 0.5B's (same vocabulary, merges and template);
# building transformers' copy from its GGUF costs half a minute, so it runs
# with --runslow only.
MODELS = ("smollm2", "qwen2.5-coder-0.5b-instruct",
          pytest.param("qwen2.5-coder-1.5b-instruct", marks=pytest.mark.slow))


def _texts() -> list[str]:
    prose = [
        "Hello world", "Hello, world!", " leading space", "trailing space ", "The quick brown fox jumps over the lazy dog.",
        "Rivers flow to the sea because gravity pulls water downhill.", "I'm sure you'll see we've done it; they'd know.",
        "DON'T SHOUT. It's FINE. You'RE ok", "o'clock rock'n'roll", "e.g. i.e. etc. Mr. Smith vs. Mrs. Jones",
        "What's 2+2? It's 4!!!", "Wait... what?!?! (really) [yes] {no} <maybe>", "a-b_c.d/e\\f|g~h`i^j",
        "email: someone@example.com, url: https://example.org/path?q=1&r=2#frag",
        "    four spaces", "\ttab start", "line one\nline two\n\nline four", "\r\nwindows\r\nnewlines\r\n",
        "many     inner      spaces", "\n\n\n", "   ", " ", "\t", "\n", "x", "!", "''", "\"quoted\" 'single'",
        "naïve café résumé façade coöperate jalapeño", "Ünïcödé ÀÉÎÕÜ ß ø å æ œ", "e\u0301 combining accent",
        "日本語のテキストです。", "中文文本，包括标点符号！", "한국어 문장입니다.", "Привет, мир! Как дела?",
        "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "Γειά σου Κόσμε", "ไทย ภาษา",
        "emoji 🤗🚀🔥 and 👩‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵", "😀😃😄😁", "✓ ✗ → ← ∑ ∫ √ ∞ ≠ ≤ ≥ © ® ™ € £ ¥",
        "\u200b zero width \u00a0 nbsp \u3000 ideographic space", "\x00\x01 control \x7f chars",
    ]
    numbers = [
        "0", "7", "42", "123", "1234", "12345", "123456789012345678901234567890", "3.14159265358979",
        "-0.5e-10", "1,000,000", "2024-06-01 12:34:56", "v1.2.3", "0x1F 0b1010 0o777", "$19.99 and €5,50",
        "call 555-123-4567", "99 bottles", " 2024", "year 1999 and 2000", "10%", "1/2 + 3/4 = 5/4", "x2 y10 z100",
        "٣٤٥ Arabic-Indic digits", "１２３ fullwidth",
    ]
    code = [
        "def f(x):\n    return x * 2\n",
        "class A:\n    def __init__(self):\n        self.a = [1, 2, 3]\n\n    def g(self):\n\t\treturn {'k': None}\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        "if x == 1 and not y:\n        pass  # comment\n    elif z != 0:\n        raise ValueError(\"bad\")",
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
        "SELECT * FROM users WHERE id = 10 AND name LIKE '%bob%';",
        "const f = async (a, b) => { await g(a ?? b); };", "x += 1;;;  y -= 2 // done",
        "<div class=\"c\">Text &amp; more</div>", "{\"key\": [1, 2.5, true, null], \"s\": \"v\"}",
        "    \n    \n\t\n", "def g():\n\n\n    pass\n\n\n\n", "a\tb\tc\t\td", "print('hi')\r\n",
        "$ ls -la | grep '\\.py$' > out.txt && echo ok", "λx. x + 1 ⇒ fun", "```python\nimport os\n```",
    ]
    specials = [
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more text", "<|im_start|> spaced <|im_end|>", "<|im_start|><|im_end|><|endoftext|>",
        "<|im_start", "im_end|>", "< |im_start| >", "<tool_call>{\"name\": \"f\"}</tool_call>",
        "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>", "<repo_name>x<file_sep>y", "<jupyter_code>print(1)",
    ]
    hh = [
        "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
        "\n\nHuman: Can you help me hack my neighbor's wifi?\n\nAssistant: I can't help with that.",
        "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?"
        "\n\nHuman: Why?\n\nAssistant: To get to the other side!",
        "Human: no leading newlines\n\nAssistant:", "\n\nAssistant:", "\n\nHuman: \n\nAssistant: ",
        "\n\nHuman: What's 17 * 23?\n\nAssistant: 17 * 23 = 391.",
    ]
    base = prose + numbers + code + specials + hh + [""]
    # Combinations put the pieces next to one another (spaces, newlines, specials between).
    joined = []
    for i, a in enumerate(base):
        b = base[(i * 7 + 3) % len(base)]
        joined.append(a + " " + b)
        joined.append(a + "\n\n" + b)
        joined.append(a + b)
    return base + joined + ["".join(base), " ".join(prose) * 3]


TEXTS = _texts()


def _gguf_path(name: str) -> str:
    try:
        return packaged_gguf_path(name)
    except PackagedModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(ours, transformers') tokenizers of one model, built once for the module."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    path = _gguf_path(request.param)
    ours = gguf_tokenizer.tokenizer_from_gguf_metadata(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return ours, ref


def test_corpus_is_varied():
    assert len(TEXTS) >= 300 and "" in TEXTS and len(set(TEXTS)) > 0.9 * len(TEXTS)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_equal_transformers(pair, add_special_tokens):
    ours, ref = pair
    mismatched = [t for t in TEXTS
                  if ours(t, add_special_tokens=add_special_tokens)["input_ids"]
                  != ref(t, add_special_tokens=add_special_tokens)["input_ids"]]
    assert not mismatched, f"{len(mismatched)} of {len(TEXTS)} differ, e.g. {mismatched[:3]!r}"


def test_batch_ids_equal_transformers(pair):
    ours, ref = pair
    assert ours(TEXTS)["input_ids"] == ref(TEXTS)["input_ids"]


def test_decode_round_trip(pair):
    ours, ref = pair
    for text in TEXTS:
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_special_tokens_equal(pair):
    ours, ref = pair
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.added_tokens_decoder == ref.added_tokens_decoder


def _conversations():
    user = {"role": "user", "content": "What is 2 + 2?"}
    answer = {"role": "assistant", "content": "It's 4.\n\nAnything else?"}
    system = {"role": "system", "content": "You are a careful assistant."}
    return [[user], [user, answer], [system, user], [system, user, answer, {"role": "user", "content": "日本語 🤗"}]]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_equal(pair, add_generation_prompt):
    ours, ref = pair
    assert ours.chat_template == ref.chat_template
    for messages in _conversations():
        kw = dict(add_generation_prompt=add_generation_prompt)
        text = ours.apply_chat_template(messages, tokenize=False, **kw)
        assert text == ref.apply_chat_template(messages, tokenize=False, **kw)
        ids = ours.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
        assert list(ids) == list(ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def test_unknown_pre_tokenizer_and_model_are_clear_errors():
    meta = {"ggml.model": "gpt2", "ggml.pre": "mystery", "ggml.tokens": ["a"], "ggml.merges": []}
    with pytest.raises(ValueError, match=r"f\.gguf.*'mystery'"):
        gguf_tokenizer.tokenizer_from_metadata("f.gguf", meta)
    with pytest.raises(ValueError, match=r"'llama'.*gpt2"):
        gguf_tokenizer.tokenizer_from_metadata("f.gguf", dict(meta, **{"ggml.model": "llama"}))


def test_pre_tokenizers_and_byte_alphabet_match_transformers_tables():
    """Names no packaged model uses (llama-bpe, llama3) are checked against transformers' table."""
    pytest.importorskip("torch")
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert gguf_tokenizer._byte_alphabet() == bytes_to_unicode()
    for name, build in gguf_tokenizer.PRE_TOKENIZERS.items():
        ours = json.loads(build().__getstate__())
        if name in GGUF_PRE_TOKENIZER_SPLITS:
            assert ours["pretokenizers"][0]["pattern"]["Regex"] == GGUF_PRE_TOKENIZER_SPLITS[name], name
        else:  # transformers keeps GPT2Tokenizer's plain byte-level split
            assert ours == json.loads(gguf_tokenizer._gpt2_split().__getstate__()), name


def test_add_bos_and_eos_are_honoured():
    path = _gguf_path("smollm2")
    meta, _ = gguf_tokenizer.read_metadata(path)
    tok = gguf_tokenizer.tokenizer_from_metadata(path, dict(meta, **{"ggml.add_bos_token": True,
                                                                     "ggml.add_eos_token": True}))
    ids = tok("hi")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok("hi", add_special_tokens=False)["input_ids"] == ids[1:-1]


def test_disk_cache_gives_the_same_tokenizer(tmp_path, monkeypatch):
    from cai_jax.weights import tokenizer as tok_lib

    monkeypatch.setenv("CAI_JAX_CACHE", str(tmp_path))
    path = _gguf_path("smollm2")
    built = tok_lib.tokenizer_from_gguf.__wrapped__(path)
    assert os.listdir(tmp_path / "tokenizers")
    cached = tok_lib.tokenizer_from_gguf.__wrapped__(path)
    for text in TEXTS[:60]:
        assert cached(text)["input_ids"] == built(text)["input_ids"]
    messages = _conversations()[-1]
    assert cached.apply_chat_template(messages, tokenize=False) == built.apply_chat_template(messages, tokenize=False)
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (
        built.bos_token_id, built.eos_token_id, built.pad_token_id)


def test_builds_without_torch(tmp_path):
    """The GGUF tokenizer path, fresh and from the disk cache, on an interpreter that cannot import torch.

    torch is blocked by `sys.modules["torch"] = None`, the way Python marks a module as
    unimportable: `import torch` (and `torch.*`) raises ImportError while
    `importlib.util.find_spec("torch")` answers None, as on a machine without torch. A
    `sys.meta_path` finder that raises would also break transformers' own probe for torch,
    which a machine without torch never does.
    """
    path = _gguf_path("smollm2")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        try:
            import torch.nn
        except ImportError:
            pass
        else:
            raise SystemExit("torch was not blocked")
        from cai_jax.weights.tokenizer import tokenizer_from_gguf
        for _ in range(2):  # built, then loaded from the (empty at first) cache
            tok = tokenizer_from_gguf.__wrapped__({path!r})
            ids = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            assert len(ids) > 3 and tok.decode(ids).endswith("assistant\\n"), tok.decode(ids)
        loaded = [m for m, mod in sys.modules.items() if m.split(".")[0] == "torch" and mod is not None]
        assert not loaded, loaded
        print("ok")
    """)
    env = dict(os.environ, CAI_JAX_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-1000:] + out.stderr[-3000:]
    assert os.listdir(tmp_path / "tokenizers")
