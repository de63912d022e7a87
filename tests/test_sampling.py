"""The sampler and scorer against independent computations.

The reference is the model's full forward pass without a cache, re-run over the
whole sequence for every new token, with argmax / log-softmax / the top-k and
top-p sets computed in NumPy from its logits.

Compiling is most of this file's time, so the tests share shapes on purpose:
most calls use 2 or 4 rows, a width-16 prompt bucket and 16 new tokens.
"""
import dataclasses
import functools
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.inference import sampling_choice as choice
from cai_jax.models.transformer import Transformer, positions_from_mask
from cai_jax.inference.sampling import TRACE_COUNTS, Sampler, SamplingParams, samples_to_arrays
from cai_jax.inference.sampling_buckets import bucket, width_bucket

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    from cai_jax.weights.loader import load_model
    return load_model("init:tiny")


@pytest.fixture(scope="module")
def tiny_sampler(tiny):
    return Sampler(tiny.config, tiny.tokenizer, mesh=None, progress=False)


@pytest.fixture(scope="module")
def smol_sampler(smollm2):
    # Scanned layers for SmolLM2: the unrolled default compiles ~5x slower with
    # 30 layers. The tiny model's tests run the unrolled path, and
    # test_unrolled_equals_scanned ties the two together.
    return Sampler(smollm2.config, smollm2.tokenizer, mesh=None, progress=False, unroll_layers=False)


@functools.lru_cache(maxsize=None)
def _forward_fn(config):
    model = Transformer(config)
    return jax.jit(lambda p, t, m: model.apply({"params": p}, t, positions_from_mask(m), m)[0]["logits"])


def full_forward(loaded, seqs, width=32, rows=4) -> np.ndarray:
    """[len(seqs), width, V] float64 logits of uncached forward passes over the
    right-padded sequences (padded to `rows` rows so it compiles once)."""
    tokens = np.zeros((max(rows, len(seqs)), width), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], mask[i, :len(s)] = s, True
    logits = _forward_fn(loaded.config)(loaded.params, jnp.asarray(tokens), jnp.asarray(mask))
    return np.asarray(logits[:len(seqs)], np.float64)


def reference_greedy(loaded, prompts, n):
    """n greedy tokens per prompt, re-running the whole sequences for each."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        logits = full_forward(loaded, seqs)
        for i, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[i, len(seq) - 1])))
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_allowed(loaded, samples, temperature, top_k, top_p):
    """Every sampled token lies in the set NumPy computes from the full
    forward's logits (temperature, then top-k, then top-p), and each returned
    log-prob is the unfiltered log-softmax there. Returns tokens checked."""
    logits = full_forward(loaded, [s.prompt_tokens.tolist() + s.tokens.tolist() for s in samples])
    checked = 0
    for row, s in enumerate(samples):
        for j, tok in enumerate(s.tokens.tolist()):
            raw = logits[row, len(s.prompt_tokens) + j - 1]
            x = raw / temperature
            if top_k:
                kth = np.sort(x)[-top_k]
                assert x[tok] >= kth, "sampled outside the top-k"
                x = np.where(x >= kth, x, -np.inf)
            if top_p < 1:
                p = np.exp(log_softmax(x))
                # the mass strictly above the token; slack for float32 vs float64
                assert p[p > p[tok]].sum() < top_p + 1e-4, "sampled outside the top-p set"
            np.testing.assert_allclose(s.logprobs[j], log_softmax(raw)[tok], atol=1e-4)
            checked += 1
    return checked


# ------------------------------------------------------------------ greedy

def test_greedy_matches_full_forward_tiny(tiny, tiny_sampler):
    prompts = [ids(tiny.tokenizer, "Constitutional AI trains a harmless assistant"),
               ids(tiny.tokenizer, "Hi")]
    got = tiny_sampler.generate(tiny.params, prompts, GREEDY)
    assert [s.tokens.tolist() for s in got] == reference_greedy(tiny, prompts, 12)
    for sample, prompt in zip(got, prompts):
        assert sample.finish_reason == "length"
        assert sample.prompt_tokens.tolist() == prompt
    check_allowed(tiny, got, 1.0, 0, 1.0)


@pytest.mark.parametrize("trunk", ["flax, scanned", "feature-major (default)"])
def test_greedy_smollm2_matches_full_forward_and_scorer(smollm2, smol_sampler, trunk):
    sampler = smol_sampler if trunk == "flax, scanned" else \
        Sampler(smollm2.config, smollm2.tokenizer, mesh=None, progress=False)
    assert sampler.trunk.name == ("flax" if trunk == "flax, scanned" else "feature_major")
    prompts = [ids(smollm2.tokenizer, "The capital of France is"),
               ids(smollm2.tokenizer, "The three primary colours are")]
    got = sampler.generate(smollm2.params, prompts, GREEDY)
    assert got[0].text.startswith(" Paris")
    assert [s.tokens.tolist() for s in got] == reference_greedy(smollm2, prompts, 12)
    assert check_allowed(smollm2, got, 1.0, 0, 1.0) == 2 * 12  # log-probs
    scored = sampler.score(smollm2.params, prompts, [s.tokens.tolist() for s in got])
    for sample, logp in zip(got, scored):
        np.testing.assert_allclose(logp, sample.logprobs, atol=1e-4)


def test_width_buckets_round_up_by_less_than_half():
    assert [width_bucket(n, 16) for n in (1, 16, 17, 25, 33, 49, 600, 769)] == \
        [16, 16, 24, 32, 48, 64, 768, 1024]
    for n in range(1, 3000):
        w = width_bucket(n)
        assert n <= w and (w <= 2 or 2 * w < 3 * n), (n, w)


def test_mixed_lengths_equal_each_alone(tiny, tiny_sampler):
    # Two prompts share a width bucket, the third needs the next one. Sampled,
    # not greedy: the per-example keys must make each row's draws independent
    # of its batch as well.
    words = "one two three four five six seven eight nine ten eleven".split()
    prompts = [ids(tiny.tokenizer, " ".join(words[:k] * r)) for k, r in ((2, 1), (9, 1), (11, 2))]
    assert [bucket(len(p), 16) for p in prompts] == [16, 16, 32]
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True)
    together = tiny_sampler.generate(tiny.params, prompts, sp, seed=3, example_ids=[7, "b", 9])
    alone = [tiny_sampler.generate(tiny.params, [p], sp, seed=3, example_ids=[e])[0]
             for p, e in zip(prompts, [7, "b", 9])]
    for t, a in zip(together, alone):
        assert t.tokens.tolist() == a.tokens.tolist()
        np.testing.assert_allclose(t.logprobs, a.logprobs, atol=1e-5)


def test_unrolled_equals_scanned(tiny, tiny_sampler):
    prompt = ids(tiny.tokenizer, "one two three four five")
    scanned = Sampler(tiny.config, tiny.tokenizer, mesh=None, progress=False, unroll_layers=False)
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True)
    a = tiny_sampler.generate(tiny.params, [prompt], sp, seed=2)[0]
    b = scanned.generate(tiny.params, [prompt], sp, seed=2)[0]
    assert a.tokens.tolist() == b.tokens.tolist()
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_same_example_id_same_sample_other_id_differs(tiny, tiny_sampler):
    # (a width-32 prompt in 4 rows: the shape of the mixed-length batch above)
    prompt = ids(tiny.tokenizer, "one two three four five six seven eight nine ten eleven " * 2)
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True)
    a, b, c = tiny_sampler.generate(tiny.params, [prompt] * 3, sp, seed=1, example_ids=[5, 5, 6])
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.tokens.tolist() != c.tokens.tolist()


# ------------------------------------------------------- sampling filters

def test_top_p_stays_in_allowed_set_smollm2(smollm2, smol_sampler):
    prompts = ["The best way to learn a language is", "My favourite food is", "Write a poem:",
               "Q: What is 2 + 2?\nA:"]
    sp = SamplingParams(temperature=0.8, top_p=0.8, max_new_tokens=12, ignore_eos=True)
    samples = smol_sampler.generate(smollm2.params, prompts, sp, seed=0)
    assert check_allowed(smollm2, samples, 0.8, 0, 0.8) == 4 * 12


@pytest.mark.parametrize("top_k,top_p,sharpen", [(3, 1.0, 1.0), (20, 0.9, 5.0)])
def test_top_k_alone_and_with_top_p_tiny(tiny, tiny_sampler, top_k, top_p, sharpen):
    # The random tiny model's next-token distribution is nearly flat; scaling its
    # (tied) embedding sharpens it, so that top-p within the top-k does cut.
    params = dict(tiny.params, embed=tiny.params["embed"] * sharpen)
    prompts = [ids(tiny.tokenizer, t) for t in ("a b c", "hello world", "x", "the end")]
    sp = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p, max_new_tokens=12, ignore_eos=True)
    samples = tiny_sampler.generate(params, prompts, sp, seed=0)
    sharpened = type(tiny)(tiny.config, params, tiny.tokenizer, tiny.source)
    assert check_allowed(sharpened, samples, 0.9, top_k, top_p) == 4 * 12
    assert any(len(set(s.tokens.tolist())) > 1 for s in samples)  # it did sample


def test_thresholds_and_draws_against_numpy():
    rng = np.random.default_rng(0)
    # Rounded values give ties; negative and -inf entries as filtered logits have.
    x = np.round(rng.normal(size=(5, 600)) * 4) / 2
    x[1, :300] = -np.inf
    for k in (1, 7, 600):
        got = np.asarray(choice.kth_largest(jnp.asarray(x.T, jnp.float32), jnp.int32(k)))
        np.testing.assert_array_equal(got, np.sort(x, axis=-1)[:, -k])
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs32 = probs.astype(np.float32)
    for top_p in (0.05, 0.5, 0.9, 0.99):
        t = np.asarray(choice.top_p_threshold(jnp.asarray(probs32.T), np.float32(top_p)))
        for row, p in enumerate(probs32):
            above = np.array([p[p > v].sum(dtype=np.float64) for v in p])
            clear = np.abs(above - top_p) > 1e-5  # away from float32 rounding at the edge
            kept = above < top_p  # transformers' rule: less mass than top_p above
            np.testing.assert_array_equal((p >= t[row])[clear], kept[clear])
    np.testing.assert_array_equal(np.asarray(choice.fast_argmax(jnp.asarray(x.T))), np.argmax(x, -1))
    # Draws follow the probabilities and never land on a zero (600 tokens: a
    # partly padded last block).
    p = np.where(rng.random(600) < 0.5, 0.0, rng.random(600)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 20000)
    drawn = np.asarray(choice.draw(keys, jnp.broadcast_to(jnp.asarray(p)[:, None], (600, 20000))))
    assert np.all(p[drawn] > 0)
    freq = np.bincount(drawn, minlength=600) / len(drawn)
    q = p / p.sum()
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q / len(drawn)) + 1e-4)


def test_scorer_against_log_softmax(tiny, tiny_sampler):
    prompts = [[5, 6, 7], [9], [100, 200, 300, 400, 500, 600]]
    conts = [[8, 9], [10, 11, 12, 13], []]
    got = tiny_sampler.score(tiny.params, prompts, conts)
    logits = full_forward(tiny, [p + c for p, c in zip(prompts, conts)])
    for i, (p, c) in enumerate(zip(prompts, conts)):
        want = [log_softmax(logits[i, len(p) + j - 1])[t] for j, t in enumerate(c)]
        assert got[i].shape == (len(c),)
        np.testing.assert_allclose(got[i], want, atol=1e-5)


# ---------------------------------------------------------------- stopping

def test_stop_string_cuts_text_and_tokens(smollm2, smol_sampler):
    decode = functools.partial(smollm2.tokenizer.decode, skip_special_tokens=True)
    prompts = ["The capital of France is", "Hello"]
    full = smol_sampler.generate(smollm2.params, prompts, GREEDY)[0]
    assert full.text.startswith(" Paris.\n\n")  # SmolLM2's greedy answer
    stops = dataclasses.replace(GREEDY, ignore_eos=False, stop_strings=("\n\n", "xyz"))
    cut = smol_sampler.generate(smollm2.params, prompts, stops)[0]
    assert cut.text == " Paris."
    assert cut.finish_reason == "stop_string"
    assert decode(cut.tokens.tolist()) == cut.text
    assert cut.tokens.tolist() == full.tokens[:len(cut.tokens)].tolist()
    np.testing.assert_allclose(cut.logprobs, full.logprobs[:len(cut.tokens)], atol=1e-6)
    # Found between decode segments, a stop string ends the loop early.
    segmented = Sampler(smollm2.config, smollm2.tokenizer, mesh=None, progress=False, unroll_layers=False,
                        stop_check_interval=4)
    steps = segmented.decode_steps
    early = segmented.generate(smollm2.params, prompts[:1] * 2,
                               dataclasses.replace(GREEDY, stop_strings=(" answer",)))
    assert early[0].text == early[1].text == " Paris.\n\nThe" == full.text[:len(early[0].text)]
    assert segmented.decode_steps - steps < 11  # not all 11 steps to the length limit
    # A stop string that starts inside a token (" Paris") drops that token:
    # text and tokens still agree, and no part of the stop string is kept.
    stops = dataclasses.replace(stops, stop_strings=("aris",))
    mid = smol_sampler.generate(smollm2.params, prompts, stops)[0]
    assert mid.finish_reason == "stop_string" and mid.text == "" and len(mid.tokens) == 0


def test_eos_ends_rows_and_loop(tiny, tiny_sampler):
    prompts = [ids(tiny.tokenizer, "first prompt"), ids(tiny.tokenizer, "a second, longer prompt here")]
    free = tiny_sampler.generate(tiny.params, prompts, GREEDY)
    # Make the third token of row 0 and the fifth of row 1 "end of turn" ids.
    stops = (int(free[0].tokens[2]), int(free[1].tokens[4]))
    steps = tiny_sampler.decode_steps
    ended = tiny_sampler.generate(tiny.params, prompts,
                                  dataclasses.replace(GREEDY, ignore_eos=False, stop_token_ids=stops))
    for sample, row in zip(ended, free):
        first = min(i for i, t in enumerate(row.tokens.tolist()) if t in stops)
        assert sample.finish_reason == "eos"
        assert sample.tokens.tolist() == row.tokens[:first + 1].tolist()
        assert len(sample.logprobs) == len(sample.tokens)
    # The while loop exits once both rows are done, long before 12 tokens.
    assert tiny_sampler.decode_steps - steps <= 4
    arrays = samples_to_arrays(ended, width=12)
    assert arrays["mask"].sum(1).tolist() == [len(s.tokens) for s in ended]


# ---------------------------------------------------------------- compiling

def test_reused_buckets_do_not_recompile(tiny):
    # Samplers of one config share compilations; a context length no other
    # test uses gives this test programs of its own.
    sampler = Sampler(tiny.config.replace(max_seq_len=400), tiny.tokenizer, mesh=None, progress=False)
    tok = tiny.tokenizer
    before = dict(TRACE_COUNTS)

    def new_traces():
        return {k: TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode", "score")}

    first = [ids(tok, "short"), ids(tok, "a somewhat longer prompt"), ids(tok, "x y"), ids(tok, "q")]
    sampler.generate(tiny.params, first, SamplingParams(temperature=0.7, max_new_tokens=10), seed=0)
    sampler.score(tiny.params, first, first)
    assert new_traces() == {"prefill": 1, "decode": 1, "score": 1}
    # The same buckets (4 rows, width 16, 16 new tokens) with other lengths,
    # batch size, temperature, token limit and seed: nothing new to compile.
    second = [ids(tok, "other words"), ids(tok, "b"), ids(tok, "c d e f g")]
    sampler.generate(tiny.params, second, SamplingParams(temperature=1.3, max_new_tokens=14), seed=5,
                     example_ids=["p", "q", "r"])
    sampler.score(tiny.params, second, [[1, 2]] * 3)
    assert new_traces() == {"prefill": 1, "decode": 1, "score": 1}
    # A longer prompt needs the next width bucket: one new prefill and decode.
    sampler.generate(tiny.params, [list(range(10, 30))], SamplingParams(temperature=0.7, max_new_tokens=10))
    assert new_traces() == {"prefill": 2, "decode": 2, "score": 1}


def test_feature_major_params_are_kept_only_while_the_callers_arrays_live(tiny, tiny_sampler):
    params = jax.tree.map(jnp.array, tiny.params)  # arrays of this test's own
    placed = tiny_sampler.place_params(params)
    cfg = tiny.config
    layer0 = jax.tree.map(lambda x: np.asarray(x)[0], params["layers"]) if "layers" in params \
        else jax.tree.map(np.asarray, params["layers_0"])
    np.testing.assert_array_equal(np.asarray(placed["layers"][0]["qkv"]["kernel_t"]),
                                  layer0["attn"]["qkv"]["kernel"].reshape(cfg.d_model, -1).T)
    np.testing.assert_array_equal(np.asarray(placed["head_dv"]), np.asarray(params["embed"]).T)
    assert tiny_sampler.place_params(dict(params)) is placed  # the same arrays: reused
    # Any changed array (here one layer's MLP, the embedding kept) makes a new copy.
    changed = jax.tree.map(lambda x: x, params)
    if "layers" in changed:
        changed["layers"]["mlp"]["down"]["kernel"] = params["layers"]["mlp"]["down"]["kernel"] * 2
    else:
        changed["layers_0"]["mlp"]["down"]["kernel"] = params["layers_0"]["mlp"]["down"]["kernel"] * 2
    placed2 = tiny_sampler.place_params(changed)
    np.testing.assert_array_equal(np.asarray(placed2["layers"][0]["down"]["kernel_t"]),
                                  2 * np.asarray(placed["layers"][0]["down"]["kernel_t"]))
    # Once the caller drops an array, the sampler holds no copy made from it.
    kept = weakref.ref(placed2["layers"][0]["down"]["kernel_t"])
    del placed, placed2
    gc.collect()
    assert kept() is not None
    del changed
    gc.collect()
    assert kept() is None



# ---------------------------------------------------------------- sharding

_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax
    from cai_jax.inference.sampling import Sampler, SamplingParams
    from cai_jax.sharding import make_mesh
    from cai_jax.weights.loader import load_model
    assert len(jax.devices()) == 8, jax.devices()
    m = load_model("init:tiny")
    head = list(range(200, 220))  # a start three prompts share (shared-prefix prefill)
    prompts = [[5, 6, 7], head + [1, 2], list(range(100, 120)), head + [3], [42], [7, 8, 9, 10, 11],
               head + [4, 5, 6], [300, 301]]
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    out = {}
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for name, mesh, shared in (("single", None, False), ("sharded", mesh, False), ("sharded/shared", mesh, True)):
        samples = Sampler(m.config, m.tokenizer, mesh=mesh, progress=False).generate(
            m.params, prompts, sp, seed=11, shared_prefix=shared)
        out[name] = [s.tokens.tolist() for s in samples]
        out[name + "/logp"] = [s.logprobs.tolist() for s in samples]
    print("RESULT" + json.dumps(out))
""")


def test_sharded_equals_unsharded():
    # The device count must be set before JAX starts: a fresh process.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
    assert out["sharded"] == out["single"] == out["sharded/shared"]
    for name in ("sharded", "sharded/shared"):
        for a, b in zip(out[name + "/logp"], out["single/logp"]):
            np.testing.assert_allclose(a, b, atol=1e-5)


SMALL = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, head_dim=16, mlp_dim=96,
             max_seq_len=64, scan_layers=True)
FAMILIES = {  # every parameter kind the feature-major trunk handles
    "llama_gqa_untied": dict(arch="llama", num_kv_heads=2, tie_embeddings=False),
    "qwen2_bias": dict(arch="llama", num_kv_heads=2, qkv_bias=True, mlp_bias=True, out_bias=True),
    "gpt2": dict(arch="gpt2", num_kv_heads=4, qkv_bias=True, out_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("family,matmul_dtype", [(f, "float32") for f in sorted(FAMILIES)]
                         + [("qwen2_bias", "bfloat16"), ("llama_gqa_untied", "bfloat16")])
def test_feature_major_trunk_equals_the_flax_model(family, matmul_dtype, tiny):
    """The default sampler (feature-major trunk) against the scanned one, which
    runs the Flax model itself: same tokens, same log-probs, same scores, with
    one row (the [D, V] head) and with several (the [V, D] head). With
    bfloat16 products both round the same operands (the sampler its weights
    once, ahead of time)."""
    from cai_jax.models.config import TransformerConfig
    from cai_jax.models.transformer import init_params
    cfg = TransformerConfig(**SMALL, **FAMILIES[family], matmul_dtype=matmul_dtype)
    leaves, tree = jax.tree.flatten(init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(1)  # init leaves norms at 1 and biases at 0: randomize every term
    params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32)
                                       for x in leaves])
    fm = Sampler(cfg, tiny.tokenizer, mesh=None, progress=False)
    flax_model = Sampler(cfg, tiny.tokenizer, mesh=None, progress=False, unroll_layers=False)
    assert (fm.trunk.name, flax_model.trunk.name) == ("feature_major", "flax")
    placed = fm.place_params(params)
    assert {placed["layers"][0]["qkv"]["kernel_t"].dtype, placed["head_vd"].dtype} == {jnp.dtype(matmul_dtype)}
    with pytest.raises(ValueError, match="feature_major trunk needs one device"):
        Sampler(cfg, tiny.tokenizer, mesh=None, unroll_layers=False, trunk="feature_major")
    with pytest.raises(ValueError, match="unknown trunk 'fast'; the trunks are feature_major, flax"):
        Sampler(cfg, tiny.tokenizer, mesh=None, trunk="fast")
    prompts = [[5, 6, 7], [9], [10, 20, 30, 40, 50, 60, 70]]
    # Sampling with both filters: equal draws need equal filtered distributions
    # (greedy against the uncached forward pass is tested above).
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=10, ignore_eos=True)
    for batch in (prompts, prompts[:1]):
        got = fm.generate(params, batch, sp, seed=4, batch_size=4)
        want = flax_model.generate(params, batch, sp, seed=4, batch_size=4)
        for g, w in zip(got, want):
            assert g.tokens.tolist() == w.tokens.tolist()
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    conts = [[8, 9], [10, 11, 12], [1]]
    for g, w in zip(fm.score(params, prompts, conts), flax_model.score(params, prompts, conts)):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_rope_scaling_reaches_both_trunks(tiny):
    """With Llama 3.1's rope scaling (pretraining context cut to 32 so that
    the prompts run past it) both trunks' greedy tokens are the argmax of the
    Flax model's uncached forward pass at every step, and their log-probs its
    log-softmax; plain RoPE would give other log-probs, so the scaling is
    checked, not only the plumbing."""
    from types import SimpleNamespace

    from cai_jax.models.config import RopeScaling, TransformerConfig
    from cai_jax.models.transformer import init_params
    scaling = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)
    cfg = TransformerConfig(**SMALL, **FAMILIES["llama_gqa_untied"], rope_scaling=scaling)
    leaves, tree = jax.tree.flatten(init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(1)
    params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32) for x in leaves])
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (40, 29, 3)]
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    scaled, plain = SimpleNamespace(config=cfg, params=params), \
        SimpleNamespace(config=cfg.replace(rope_scaling=None), params=params)
    trunks = (Sampler(cfg, tiny.tokenizer, mesh=None, progress=False),
              Sampler(cfg, tiny.tokenizer, mesh=None, progress=False, unroll_layers=False))
    assert [t.trunk.name for t in trunks] == ["feature_major", "flax"]
    for sampler in trunks:
        got = sampler.generate(params, prompts, greedy, batch_size=4)
        seqs = [s.prompt_tokens.tolist() + s.tokens.tolist() for s in got]
        logits, plain_logits = full_forward(scaled, seqs, width=64), full_forward(plain, seqs, width=64)
        differs = 0.0
        for row, (s, prompt) in enumerate(zip(got, prompts)):
            steps = np.arange(len(prompt) - 1, len(prompt) - 1 + len(s.tokens))
            assert s.tokens.tolist() == logits[row, steps].argmax(-1).tolist(), sampler.trunk.name
            np.testing.assert_allclose(s.logprobs, log_softmax(logits[row, steps])[np.arange(12), s.tokens],
                                       atol=1e-4)
            unscaled = log_softmax(plain_logits[row, steps])[np.arange(12), s.tokens]
            differs = max(differs, np.abs(unscaled - s.logprobs).max())
        # About 0.02 (flat random-weight distributions): far beyond the 1e-4
        # above, so a trunk that dropped the scaling would fail it.
        assert differs > 1e-3, sampler.trunk.name
