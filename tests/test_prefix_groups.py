"""Shared-prefix option scoring: the same log-probs as a full forward pass
over each whole prompt, for groups of every shape."""
import numpy as np
import pytest

from cai_jax import sharding as shd
from cai_jax.constitution import load_default_constitution
from cai_jax.data.conversation import user
from cai_jax.inference import prefix_groups as pxs
from cai_jax.inference.option_scorer import OptionScorer
from cai_jax.rl_cai import feedback as fb
from cai_jax.weights.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def tiny():
    # Embeddings scaled up so that log-probs differ clearly between prompts.
    model = load_model("init:tiny", seed=3, to_device=False)
    params = dict(model.params)
    params["embed"] = np.asarray(params["embed"]) * 40.0
    return LoadedModel(model.config, params, model.tokenizer, model.source)


def test_split_groups_by_hand():
    prompts = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3], [9, 8], [7, 1], [6]]
    groups = pxs.split_groups(prompts, ["a", "a", "b", "b", "c", "c"])
    assert [(g.prefix, g.rows, g.suffixes) for g in groups] == [
        ([1, 2], [0, 1], [[3, 4], [5]]),
        ([], [2, 3], [[1, 2, 3], [9, 8]]),
        # The LCP of [7, 1] and [6] is empty; a one-token prompt keeps its token as suffix.
        ([], [4, 5], [[7, 1], [6]]),
    ]
    # One prompt the prefix of another: the shorter keeps its last token as suffix.
    [g] = pxs.split_groups([[1, 2, 3], [1, 2, 3, 4]], [0, 0])
    assert g.prefix == [1, 2] and g.suffixes == [[3], [3, 4]]
    # A lone prompt: all but its last token is prefix. Big groups are split by
    # the batches, each part keeping the group's prefix.
    assert pxs.split_groups([[5, 6, 7]], [0])[0].suffixes == [[7]]
    batches = pxs.batches_of_groups([[1, 2, i] for i in range(5)], [0] * 5, batch_size=2)
    parts = [g for batch in batches for g in batch]
    assert [g.rows for g in parts] == [[0, 1], [2, 3], [4]] and all(g.prefix == [1, 2] for g in parts)


def test_auto_keys_groups_prompts_that_share_a_start():
    head = list(range(100, 120))  # 20 tokens
    prompts = [head + [1, 2], [7] * 30, head + [3], head + [1, 5, 6], [8, 9]]
    keys = pxs.auto_keys(prompts, min_prefix=16)
    assert keys[0] == keys[2] == keys[3]
    assert len({keys[0], keys[1], keys[4]}) == 3
    # A short common start is not worth a group.
    assert len(set(pxs.auto_keys([[1, 2, 3, 4], [1, 2, 3, 5]], min_prefix=16))) == 2


def test_auto_keys_keeps_a_long_start_rather_than_a_short_one_for_all():
    a, b = [1] * 16 + [2] * 40, [1] * 16 + [3] * 40
    # Two pairs sharing 56 tokens each beat one group of four sharing 16: 2 * 55 > 3 * 16.
    prompts = [a + [4], a + [5], b + [6], b + [7]]
    keys = pxs.auto_keys(prompts, min_prefix=8)
    assert keys[0] == keys[1] != keys[2] == keys[3]


def test_batches_of_groups_cut_groups_at_batch_boundaries():
    prompts = [[1] * 20 + [i] * (i + 1) for i in range(5)] + [[2] * 30, [3] * 4]
    keys = [0] * 5 + [1, 2]
    batches = pxs.batches_of_groups(prompts, keys, batch_size=3)
    rows = [[r for g in batch for r in g.rows] for batch in batches]
    assert sorted(r for batch in rows for r in batch) == list(range(7))
    assert all(len(batch) == 3 for batch in rows[:-1])
    assert rows[0] == [5, 4, 3]  # longest group first, its rows longest first
    for batch in batches:
        for g in batch:
            for r, suffix in zip(g.rows, g.suffixes):
                assert g.prefix + suffix == prompts[r]
            if len(g.rows) > 1 and keys[g.rows[0]] == 0:
                assert g.prefix == [1] * 20


def test_shared_prefix_log_probs_equal_full_forward(tiny):
    scorer = OptionScorer(tiny.config, tiny.params, 11, 12, batch_size=4, max_len=256, min_bucket=16,
                          mesh=shd.make_mesh({"data": -1}))
    rng = np.random.default_rng(0)
    vocab = tiny.config.vocab_size
    prompts, keys = [], []
    for g, (n_prefix, n_rows) in enumerate([(40, 2), (3, 4), (70, 1), (0, 3), (25, 6), (90, 2)]):
        prefix = list(rng.integers(1, vocab, n_prefix))
        for _ in range(n_rows):
            prompts.append(prefix + list(rng.integers(1, vocab, rng.integers(1, 30))))
            keys.append(g)
    prompts.append(prompts[0][:41])  # a prompt that is a prefix of another in its group
    keys.append(0)
    full = scorer.option_logprobs(prompts)
    shared = scorer.option_logprobs(prompts, keys=keys)
    np.testing.assert_allclose(shared, full, atol=1e-4)
    assert np.ptp(full[:, 0]) > 1.0  # the prompts give clearly different answers


@pytest.mark.parametrize("source,exemplars", [("multiple_choice", 2), ("pointwise", 0), ("pointwise", 1)])
def test_labels_with_and_without_shared_prefix(tiny, source, exemplars):
    kind = fb.PointwiseLabeler if source == "pointwise" else fb.FeedbackLabeler
    comparisons = [
        fb.FeedbackComparison("c0", "harmless", (user("How do I pick a lock?"),), "I can't help with that.",
                              "Insert a tension wrench and rake the pins."),
        fb.FeedbackComparison("c1", "helpful", (user("Name a prime."),), "Eleven is prime.", "Nine."),
        fb.FeedbackComparison("c2", "harmless", (user("Tell me a joke about my boss."),), "Why did the boss...", "No."),
    ]
    labels = {}
    for shared in (False, True):
        labeler = kind(tiny, load_default_constitution(), style="hh", num_principles=2, num_exemplars=exemplars,
                       seed=5, batch_size=4, max_len=512, min_bucket=64, shared_prefix=shared,
                       mesh=shd.make_mesh({"data": -1}))
        labels[shared] = labeler.label(comparisons)
    for full, shared in zip(labels[False], labels[True]):
        assert abs(full["p_a"] - shared["p_a"]) < 1e-4
        assert abs(full["option_mass"] - shared["option_mass"]) < 1e-4


def test_pick_keys_takes_the_grouping_with_least_to_run():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [9, 2, 3, 4, 5]]
    together, apart = [0, 0, 1], [0, 1, 2]
    # [1, 2, 3, 4] once + [5] + [6]; the lone prompt runs whole: 6 + 5 tokens.
    assert pxs.tokens_to_run(pxs.split_groups(prompts, together)) == 11
    assert pxs.tokens_to_run(pxs.split_groups(prompts, apart)) == 15
    assert pxs.pick_keys(prompts, [apart, together]) == together
