"""grain loader (shuffle, batch, shard, resume) and the TFDS array_record builders."""

import json
import sys

import numpy as np
import pytest

from cai_jax.data.conversation import Turn
from cai_jax.data.hh_rlhf import PreferencePair
from cai_jax.data.loaders import make_dataset, shard_indices, split_heldout
from cai_jax.data.prompt_sets import embedded_prompts


def _to_arrays(i):
    return {"x": np.array([i, 10 * i], dtype=np.int32)}


def _firsts(batches):
    return [b["x"][:, 0].tolist() for b in batches]


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_one_epoch_sees_every_example_once_in_shuffled_order():
    ds = make_dataset(list(range(20)), _to_arrays, batch_size=4, seed=0, num_epochs=1)
    batches = list(ds)
    assert len(batches) == 5
    assert all(b["x"].shape == (4, 2) and b["x"].dtype == np.int32 for b in batches)
    assert all((b["x"][:, 1] == 10 * b["x"][:, 0]).all() for b in batches)
    order = sum(_firsts(batches), [])
    assert sorted(order) == list(range(20))
    assert order != list(range(20))


def test_no_shuffle_keeps_order_and_remainder():
    ds = make_dataset(list(range(7)), _to_arrays, batch_size=3, shuffle=False, num_epochs=1, drop_remainder=False)
    assert _firsts(ds) == [[0, 1, 2], [3, 4, 5], [6]]
    ds = make_dataset(list(range(7)), _to_arrays, batch_size=3, shuffle=False, num_epochs=1)
    assert _firsts(ds) == [[0, 1, 2], [3, 4, 5]]


def test_seed_controls_order_and_epochs_differ():
    a = _firsts(make_dataset(list(range(30)), _to_arrays, batch_size=30, seed=1, num_epochs=2))
    b = _firsts(make_dataset(list(range(30)), _to_arrays, batch_size=30, seed=1, num_epochs=2))
    c = _firsts(make_dataset(list(range(30)), _to_arrays, batch_size=30, seed=2, num_epochs=2))
    assert a == b and a != c
    assert sorted(a[0]) == sorted(a[1]) == list(range(30)) and a[0] != a[1]


@pytest.mark.parametrize("num_threads", [0, 2])
def test_resumed_iterator_continues_with_the_same_batches(num_threads):
    def make():
        return make_dataset(list(range(23)), _to_arrays, batch_size=4, seed=7, num_threads=num_threads)

    unbroken = iter(make())
    _take(unbroken, 3)
    expected = _firsts(_take(unbroken, 8))  # crosses the epoch boundary (23 examples)

    first = iter(make())
    _take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # must survive a trip through JSON
    resumed = iter(make())
    resumed.set_state(state)
    assert _firsts(_take(resumed, 8)) == expected


def test_shards_are_disjoint_equal_and_cover_the_data():
    assert list(shard_indices(10, 1, 3)) == [1, 4, 7]
    assert list(shard_indices(10, 0, 3)) == [0, 3, 6]  # example 9 dropped so shards stay equal
    assert list(shard_indices(10, 0, 3, drop_uneven=False)) == [0, 3, 6, 9]
    seen = []
    for index in range(3):
        ds = make_dataset(list(range(10)), _to_arrays, batch_size=1, seed=0, num_epochs=1,
                          shard_index=index, shard_count=3)
        seen.append(sorted(sum(_firsts(ds), [])))
    assert seen == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError, match="bad shard"):
        make_dataset(list(range(10)), _to_arrays, batch_size=1, shard_index=3, shard_count=3)
    with pytest.raises(ValueError, match="has no examples"):
        make_dataset([1], _to_arrays, batch_size=1, shard_index=0, shard_count=2)


def test_heldout_split_is_by_id_and_never_empty_or_total():
    examples = [{"id": f"e{i}"} for i in range(20)]
    train, held = split_heldout(examples, 0.25, salt="s")
    assert len(held) == 5 and len(train) == 15
    assert {e["id"] for e in train} | {e["id"] for e in held} == {e["id"] for e in examples}
    # Independent of order (each part keeps the given order): the same ids are held out.
    assert split_heldout(list(reversed(examples)), 0.25, salt="s")[1] == list(reversed(held))
    assert split_heldout(examples, 0.25, salt="other")[1] != held  # each stage salts its own slice
    assert len(split_heldout(examples[:2], 0.01, salt="s")[1]) == 1
    assert len(split_heldout(examples[:2], 0.99, salt="s")[1]) == 1
    assert split_heldout(examples[:1], 0.5, salt="s")[1] == []
    assert split_heldout(examples, 0.0, salt="s") == (examples, [])


def test_heldout_split_keeps_a_group_together():
    # Three pairs per prompt: a prompt's pairs are all trained on or all held out.
    examples = [{"id": f"p{i}" + (f"#{k + 1}" if k else "")} for i in range(10) for k in range(3)]
    train, held = split_heldout(examples, 0.2, salt="s", group=lambda i: i.split("#")[0])
    held_prompts = {e["id"].split("#")[0] for e in held}
    assert len(held_prompts) == 2 and len(held) == 6
    assert not held_prompts & {e["id"].split("#")[0] for e in train}


# ------------------------------------------------------------------ TFDS

@pytest.fixture(scope="module")
def tfds_builder_module():
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds.disable_progress_bar()
    from cai_jax.data import tfds_builder
    return tfds_builder


def test_hh_pairs_array_record_round_trip_without_tensorflow(tmp_path, tfds_builder_module):
    tb = tfds_builder_module
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Rob a bank?\n\nAssistant: No, sorry.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Rob a bank?\n\nAssistant: Sure."},
        {"chosen": "\n\nHuman: Café?\n\nAssistant: Oui.", "rejected": "\n\nHuman: Café?\n\nAssistant: Non."},
        {"chosen": "\n\nHuman: bad line"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    builder = tb.prepare_hh_pairs({"train": [str(path)]}, tmp_path / "tfds", name="tiny", on_error="skip")
    assert builder.read_stats["train"].skipped == 1
    assert (tmp_path / "tfds" / "hh_preference_pairs" / "tiny" / "1.0.0").is_dir()
    source = builder.as_data_source(split="train")
    assert len(source) == 2
    pairs = sorted((tb.decode_pair(source[i]) for i in range(len(source))), key=lambda p: p.line)
    assert pairs == [
        PreferencePair((Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Rob a bank?")),
                       "No, sorry.", "Sure.", 1, "pairs.jsonl"),
        PreferencePair((Turn("user", "Café?"),), "Oui.", "Non.", 2, "pairs.jsonl"),
    ]
    # The grain loader reads the tfds source directly.
    ds = make_dataset(source, lambda r: np.array(len(tb.decode_pair(r).context), np.int32),
                      batch_size=2, seed=0, num_epochs=1)
    [batch] = list(ds)
    assert sorted(batch.tolist()) == [1, 3]
    assert "tensorflow" not in sys.modules


def test_prompt_set_builder_matches_the_embedded_split(tmp_path, tfds_builder_module):
    tb = tfds_builder_module
    builder = tb.prepare_prompt_set("helpful", tmp_path / "tfds")
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        got = sorted(tb.decode_prompt(source[i], "helpful").id for i in range(len(source)))
        assert got == sorted(p.id for p in embedded_prompts("helpful", split))
