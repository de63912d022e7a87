"""Shared-prefix prefill: the sampler computes a start that prompts share once
per batch, and what it returns equals the whole-prompt path (the reference,
itself checked against uncached forward passes in test_sampling.py): greedy
tokens identical, log-probs within float rounding."""
import numpy as np
import pytest

from cai_jax.inference import prefix_groups
from cai_jax.inference.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
# The two paths add the same float32 terms in another order, so their log-probs
# differ by some ulps of the log-sum-exp behind them, which grows with the
# model's logits: 2e-6 measured on the tiny model, 9.5e-6 on SmolLM2-135M (an
# AMD EPYC machine, where the earlier 2e-5 had only 2x to spare). A real
# difference in what a row attends to moves log-probs by far more: one prompt
# token changed 20 to 40 positions back moved the tiny model's later log-probs
# by 3e-4 to 5e-2 (median 5e-3).
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    from cai_jax.weights.loader import load_model
    return load_model("init:tiny")


def mixed_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Groups of 1 to 5 rows with prefixes of 17 to 70 tokens, a row that is
    its group's prefix plus one token, a row whose prompt is all prefix of
    another row, and prompts that share nothing."""
    rng = np.random.default_rng(seed)
    prompts = []
    for n_prefix, n_rows in [(40, 3), (17, 1), (70, 5), (25, 2)]:
        prefix = list(rng.integers(1, vocab, n_prefix))
        for _ in range(n_rows):
            prompts.append(prefix + list(rng.integers(1, vocab, rng.integers(1, 20))))
    prompts.append(prompts[0][:41])  # the 40-token prefix and one more token
    prompts.append(prompts[4][:60])  # a start of another row in its group
    prompts += [list(rng.integers(1, vocab, n)) for n in (3, 30)]
    return prompts


def assert_same_samples(whole, shared):
    for i, (a, b) in enumerate(zip(whole, shared)):
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=f"prompt {i}")
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=LOGPROB_TOL, err_msg=f"prompt {i}")
        assert a.finish_reason == b.finish_reason and a.text == b.text


def test_the_prompts_do_share_starts(tiny):
    prompts = mixed_prompts(tiny.config.vocab_size)
    batches = prefix_groups.batches_of_groups(prompts, prefix_groups.auto_keys(prompts), batch_size=8)
    sizes = sorted(len(g.rows) for batch in batches for g in batch if g.prefix)
    assert max(sizes) >= 4 and any(len(batch) > 1 for batch in batches)  # mixed groups in one batch
    assert prefix_groups.tokens_to_run([g for b in batches for g in b]) < sum(map(len, prompts)) * 0.6


@pytest.mark.parametrize("trunk", ["feature_major", "flax", "scanned", "remat"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_greedy_tokens_identical_with_and_without_sharing(tiny, trunk, batch_size):
    # "remat": a model config that trains with rematerialised layers (the pod
    # config's), which the sampler must run as plain layers.
    config = tiny.config.replace(remat="full") if trunk == "remat" else tiny.config
    sampler = Sampler(config, tiny.tokenizer, mesh=None, progress=False, unroll_layers=trunk != "scanned",
                      trunk="flax" if trunk in ("scanned", "remat") else trunk)
    prompts = mixed_prompts(tiny.config.vocab_size)
    whole = sampler.generate(tiny.params, prompts, GREEDY, batch_size=batch_size)
    shared = sampler.generate(tiny.params, prompts, GREEDY, batch_size=batch_size, shared_prefix=True)
    assert_same_samples(whole, shared)


def test_sampled_answers_do_not_depend_on_sharing_or_batching(tiny):
    sampler = Sampler(tiny.config, tiny.tokenizer, mesh=None, progress=False, shared_prefix=True)
    prompts = mixed_prompts(tiny.config.vocab_size, seed=1)
    hot = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    ids = [f"p{i}" for i in range(len(prompts))]
    shared = sampler.generate(tiny.params, prompts, hot, seed=4, example_ids=ids, batch_size=8)
    whole = sampler.generate(tiny.params, prompts, hot, seed=4, example_ids=ids, batch_size=2,
                             shared_prefix=False)
    assert_same_samples(whole, shared)
    assert len({tuple(s.tokens) for s in shared}) > len(prompts) // 2  # really sampled


def test_stop_strings_and_eos_with_sharing(smollm2):
    sampler = Sampler(smollm2.config, smollm2.tokenizer, mesh=None, progress=False, unroll_layers=False)
    system = "You are a careful assistant. Answer in one short sentence, then stop."
    questions = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?"]
    prompts = [smollm2.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": q}],
        tokenize=False, add_generation_prompt=True) for q in questions]
    sp = SamplingParams(temperature=0, max_new_tokens=24, stop_strings=(".",))
    whole = sampler.generate(smollm2.params, prompts, sp, batch_size=4)
    shared = sampler.generate(smollm2.params, prompts, sp, batch_size=4, shared_prefix=True)
    assert_same_samples(whole, shared)
    assert "Paris" in whole[0].text


def test_score_with_sharing_equals_the_full_pass(tiny):
    sampler = Sampler(tiny.config, tiny.tokenizer, mesh=None, progress=False)
    prompts = mixed_prompts(tiny.config.vocab_size, seed=2)
    rng = np.random.default_rng(3)
    conts = [list(rng.integers(1, tiny.config.vocab_size, n)) for n in rng.integers(0, 9, len(prompts))]
    whole = sampler.score(tiny.params, prompts, conts, batch_size=4)
    shared = sampler.score(tiny.params, prompts, conts, batch_size=4, shared_prefix=True)
    for i, (a, b, c) in enumerate(zip(whole, shared, conts)):
        assert len(a) == len(b) == len(c)
        np.testing.assert_allclose(b, a, atol=LOGPROB_TOL, err_msg=f"prompt {i}")


def test_next_token_logprobs_with_caller_groups(tiny):
    sampler = Sampler(tiny.config, tiny.tokenizer, mesh=None, progress=False)
    prompts = mixed_prompts(tiny.config.vocab_size, seed=5)
    tokens = [7, 11, 13]
    whole = sampler.next_token_logprobs(tiny.params, prompts, tokens, batch_size=4)
    # Every prompt in one group: most share nothing, so the group's prefix is empty.
    for keys in (prefix_groups.auto_keys(prompts), [0] * len(prompts)):
        shared = sampler.next_token_logprobs(tiny.params, prompts, tokens, batch_size=4, keys=keys)
        np.testing.assert_allclose(shared, whole, atol=LOGPROB_TOL)
    # The reference: NumPy's log-softmax of the Flax model's logits at each
    # prompt's last token, from an uncached forward pass.
    logits = full_logits(tiny, prompts)
    for i, p in enumerate(prompts):
        row = logits[i, len(p) - 1]
        reference = row - row.max() - np.log(np.exp(row - row.max()).sum())
        np.testing.assert_allclose(whole[i], reference[tokens], atol=1e-4)


def full_logits(loaded, prompts, width=128):
    import jax.numpy as jnp
    from cai_jax.models.transformer import Transformer, positions_from_mask
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], mask[i, :len(p)] = p, True
    out, _ = Transformer(loaded.config).apply({"params": loaded.params}, jnp.asarray(tokens),
                                              positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    return np.asarray(out["logits"], np.float64)


@pytest.mark.parametrize("unroll", [True, False])
def test_a_kv_store_continues_the_last_call(tiny, unroll, monkeypatch):
    """A second call whose prompts extend the first call's prompts and answers
    (SL-CAI's next step) reads those starts from the store: the same answers
    as whole prompts."""
    from cai_jax.inference import kv_store as kv

    used = []
    original = kv.prefix_arrays
    monkeypatch.setattr(kv, "prefix_arrays", lambda *a, **k: used.append(1) or original(*a, **k))
    sampler = Sampler(tiny.config, tiny.tokenizer, mesh=None, progress=False, unroll_layers=unroll,
                      shared_prefix=True)
    rng = np.random.default_rng(6)
    vocab = tiny.config.vocab_size
    prompts = mixed_prompts(vocab, seed=6)
    ids = [f"p{i}" for i in range(len(prompts))]
    store = kv.KVStore()
    first = sampler.generate(tiny.params, prompts, GREEDY, example_ids=ids, batch_size=4, kv_store=store)
    assert len(store) == len(prompts)
    following = [p + list(a.tokens[:k]) + list(rng.integers(1, vocab, 5))
                 for p, a, k in zip(prompts, first, rng.integers(0, 12, len(prompts)))]
    following[1] = following[1][:3] + [5, 6]  # leaves its stored sequence early
    following.append(list(rng.integers(1, vocab, 25)))  # a new example: nothing stored
    ids.append("new")
    whole = sampler.generate(tiny.params, following, GREEDY, example_ids=ids, batch_size=4, shared_prefix=False)
    continued = sampler.generate(tiny.params, following, GREEDY, example_ids=ids, batch_size=4, kv_store=store)
    assert used, "the second call did not read the store"
    assert_same_samples(whole, continued)
    assert len(store) == len(following)  # both calls' examples (kept for two calls)


def test_kv_store_keeps_an_entry_for_keep_calls_calls():
    from cai_jax.inference.kv_store import KVStore
    store = KVStore(keep_calls=2)
    keys = [np.arange(12, dtype=np.float32).reshape(2, 2, 3)]
    values = [np.arange(12, dtype=np.float32).reshape(2, 3, 2)]
    store.add("a", np.array([5, 6, 7]), keys, values)
    assert store.reusable("a", [5, 6, 7, 8]) == 0  # not before its call ends
    store.end_call()
    assert store.reusable("a", [5, 6, 7, 8]) == 3
    assert store.reusable("a", [5, 6, 7]) == 2  # the prompt's last token always runs
    assert store.reusable("a", [5, 9]) == 1 and store.reusable("b", [5, 6]) == 0
    k, v = store.prefix("a", 2)
    np.testing.assert_array_equal(k[0], keys[0][..., :2])
    np.testing.assert_array_equal(v[0], values[0][:, :2])
    store.end_call()  # a call without "a": still there (a skipped step)
    assert len(store) == 1
    store.end_call()
    assert len(store) == 0
