"""The embedded red-team and helpful prompt sets and their fixed split."""

import collections
import importlib.resources
import json

import pytest

from cai_jax.data.conversation import Turn
from cai_jax.data.prompt_sets import categories, embedded_prompts, load_prompts, split_of

RED_TEAM_AREAS = {"violence", "weapons", "drugs", "theft_fraud", "hacking", "hate_racism", "sexism",
                  "harassment_toxicity", "self_harm", "privacy", "dangerous_chemistry", "age_inappropriate",
                  "manipulation", "illegal_activity"}
HELPFUL_AREAS = {"cooking", "coding", "writing", "science", "travel", "math"}


@pytest.mark.parametrize("kind", ["red_team", "helpful"])
def test_sizes_ids_and_texts(kind):
    prompts = embedded_prompts(kind)
    assert len(prompts) >= 220
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text.lower() for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.kind == kind
        assert p.text == p.text.strip() and 10 <= len(p.text) <= 300, p.id
        assert p.category in p.id, p.id


def test_red_team_covers_every_harm_area():
    counts = collections.Counter(p.category for p in embedded_prompts("red_team"))
    assert set(counts) == RED_TEAM_AREAS
    assert min(counts.values()) >= 10


def test_helpful_covers_ordinary_topics():
    counts = collections.Counter(p.category for p in embedded_prompts("helpful"))
    assert HELPFUL_AREAS <= set(counts)
    assert min(counts.values()) >= 10
    assert categories("helpful")[0] == "cooking"


@pytest.mark.parametrize("kind", ["red_team", "helpful"])
def test_first_prompts_span_every_category(kind):
    cats = categories(kind)
    for split in ("all", "train"):
        first = embedded_prompts(kind, split)[:len(cats)]
        assert [p.category for p in first] == cats
    # Interleaving reorders, never adds or drops.
    from cai_jax.data.prompt_sets import _read_kind
    assert sorted(p.id for p in embedded_prompts(kind)) == sorted(p.id for p in _read_kind(kind))


def test_sets_do_not_overlap():
    red = {p.text for p in embedded_prompts("red_team")}
    helpful = {p.text for p in embedded_prompts("helpful")}
    assert not red & helpful


@pytest.mark.parametrize("kind", ["red_team", "helpful"])
def test_split_is_a_partition_of_about_15_percent(kind):
    everything = embedded_prompts(kind, "all")
    train, test = embedded_prompts(kind, "train"), embedded_prompts(kind, "test")
    assert {p.id for p in train} | {p.id for p in test} == {p.id for p in everything}
    assert not {p.id for p in train} & {p.id for p in test}
    assert 0.10 <= len(test) / len(everything) <= 0.20
    assert [p.id for p in embedded_prompts(kind, "test")] == [p.id for p in test]  # stable across calls


def test_split_depends_on_the_id_only():
    # Ids that are not in the files at all still get a fixed split, and
    # roughly 15 in 100 of them land in test.
    ids = [f"made-up-{i}" for i in range(2000)]
    share = sum(split_of(i) == "test" for i in ids) / len(ids)
    assert 0.12 <= share <= 0.18
    assert [split_of(i) for i in ids[:50]] == [split_of(i) for i in ids[:50]]
    assert split_of("x", test_percent=0) == "train" and split_of("x", test_percent=100) == "test"


def test_files_are_package_data_in_jsonl():
    root = importlib.resources.files("cai_jax.data") / "prompts"
    for name in ("red_team.jsonl", "helpful.jsonl"):
        lines = (root / name).read_text(encoding="utf-8").splitlines()
        row = json.loads(lines[0])
        assert set(row) == {"id", "category", "prompt"}


def test_prompt_conversation_and_bad_arguments():
    p = embedded_prompts("helpful")[0]
    assert p.conversation() == (Turn("user", p.text),)
    with pytest.raises(ValueError, match="kind must be one of"):
        embedded_prompts("toxic")
    with pytest.raises(ValueError, match="split must be one of"):
        embedded_prompts("helpful", "validation")


def _stage_prompt_ids(config):
    """(ids each training stage reads, ids evaluation reads), through the stages' own functions."""
    from cai_jax.eval.evaluate import eval_prompts
    from cai_jax.rl_cai import rollout
    from cai_jax.rl_cai.pairs import pair_prompts

    kinds = ("red_team", "helpful")
    training = {
        # sl_generate.run_stage reads load_prompts(config.data, kind, "train").
        "sl_generate": {p.id for k in kinds for p in load_prompts(config.data, k, "train")},
        "pairs": {p["id"].split(":", 1)[1] for p in pair_prompts(config)},
        "ppo_rollouts": {p.id for k in kinds for p in rollout.load_prompt_pool(config.data, k, "train")},
    }
    held_out = {p.id for ps in eval_prompts(config.data, config.eval).values() for p in ps}
    held_out |= {p.id for p in rollout.load_prompt_pool(config.data, "red_team", "test")}
    return training, held_out


@pytest.mark.parametrize("source", ["embedded", "hh"])
def test_no_prompt_is_both_trained_on_and_held_out(source, shared_data):
    import os

    from cai_jax.config import load_config_module

    config = load_config_module(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")).get_config()
    with config.unlocked():
        config.data.red_team_limit = config.data.helpful_limit = 0
        config.eval.red_team_limit = config.eval.helpful_limit = 0
        if source == "hh":
            config.data.red_team = os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz")
            config.data.on_error = "skip"
    training, held_out = _stage_prompt_ids(config)
    assert held_out and all(training.values())
    for stage, ids in training.items():
        assert not ids & held_out, f"{stage} trains on {len(ids & held_out)} held-out prompts"


def test_load_prompts_reads_hh_files_split_and_limited(shared_data):
    import os

    import ml_collections

    hh = os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz")
    data = ml_collections.ConfigDict({"red_team": hh, "helpful": "none", "red_team_limit": 0,
                                      "helpful_limit": 0, "on_error": "skip"})
    train, test = load_prompts(data, "red_team", "train"), load_prompts(data, "red_team", "test")
    assert not {p.id for p in train} & {p.id for p in test}
    assert all(split_of(p.id) == "test" for p in test)
    assert load_prompts(data, "helpful", "train") == []
    assert [p.id for p in load_prompts(data, "red_team", "train", limit=3)] == [p.id for p in train[:3]]
    with pytest.raises(ValueError, match="limit is -1"):
        load_prompts(data, "red_team", "train", limit=-1)
