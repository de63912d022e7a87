"""Answer pairs from the SL-CAI model: record format, prompt selection,
per-answer seeding, and resuming a killed stage."""
import json
import os

import pytest

from cai_jax import artifacts
from cai_jax.config import load_config_module
from cai_jax.data.conversation import answer_stop_strings, build_initial_prompt, user
from cai_jax.data.prompt_sets import embedded_prompts
from cai_jax.pipeline import StageContext
from cai_jax.sharding import mesh_from_config
from cai_jax.rl_cai import pairs
from cai_jax.inference.sampling import Sampler, SamplingParams
from cai_jax.inference.sampling_buckets import cut_at_stops
from cai_jax.weights.loader import load_model
from cai_jax.weights.model_dir import save_model_dir

base_config = load_config_module(
    os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")).base_config


def make_config(render="chat"):
    config = base_config()
    config.model.name = "tiny"
    config.data.red_team_limit = 3
    config.data.helpful_limit = 2
    config.data.render = render
    config.sampling.max_new_tokens = 8
    config.sampling.batch_size = 4
    config.pairs = pairs.get_default_config()
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A work directory whose "SL-CAI model" is a random init:tiny."""
    root = tmp_path_factory.mktemp("pairs")
    model = load_model("init:tiny", seed=2, to_device=False)
    save_model_dir(str(root / "models" / "sl_cai"), model.config, model.params, model.tokenizer)
    return root


def test_pair_prompts_follow_the_limits():
    config = make_config()
    prompts = pairs.pair_prompts(config)
    red = embedded_prompts("red_team", "train")[:3]
    helpful = embedded_prompts("helpful", "train")[:2]
    assert [p["id"] for p in prompts] == [f"harmless:{p.id}" for p in red] + [f"helpful:{p.id}" for p in helpful]
    assert prompts[0]["conversation"] == red[0].conversation()
    config.pairs.include_helpful = False
    config.pairs.red_team_limit = 2
    assert [p["kind"] for p in pairs.pair_prompts(config)] == ["harmless", "harmless"]


def test_several_pairs_per_prompt_get_their_own_ids():
    config = make_config()
    config.pairs.include_helpful = False
    config.pairs.red_team_limit = 2
    config.pairs.pairs_per_prompt = 3
    red = embedded_prompts("red_team", "train")[:2]
    ids = [p["id"] for p in pairs.pair_prompts(config)]
    # The first pair keeps the prompt's id, so one pair per prompt is unchanged.
    assert ids == [f"harmless:{p.id}" + suffix for p in red for suffix in ("", "#2", "#3")]
    assert {pairs.prompt_key(i) for i in ids} == {f"harmless:{p.id}" for p in red}


def test_answers_are_cut_at_the_next_turn():
    stops = answer_stop_strings("hh")
    assert cut_at_stops(" Sure thing.\n\nHuman: and more", stops).strip() == "Sure thing."
    assert cut_at_stops("a\n\nB: b\n\nHuman: c", ("\n\nHuman:", "\n\nB:")) == "a"  # earliest stop
    assert cut_at_stops("  plain  ", answer_stop_strings("chat")) == "  plain  "


def test_stage_writes_pairs_and_resumes_to_the_same_file(workdir):
    config = make_config()
    ctx = StageContext(config, str(workdir), mesh_from_config(config), progress=False)
    summary = pairs.run_stage(ctx)
    records = artifacts.read_jsonl(ctx.path("pairs.jsonl"))
    assert summary["pairs"] == 5 and summary["harmless"] == 3 and summary["helpful"] == 2
    assert [r["kind"] for r in records] == ["harmless"] * 3 + ["helpful"] * 2
    for r in records:
        assert set(r) >= {"id", "kind", "prompt", "answer_a", "answer_b", "finish_a", "finish_b", "sampling"}
        assert r["prompt"][-1]["role"] == "user" and r["sampling"]["temperature"] == 1.0
    # Two independent samples: with a random model they differ.
    assert sum(r["answer_a"] != r["answer_b"] for r in records) >= 4

    # Each answer depends only on (seed, id, slot): the sampler reproduces it alone.
    model = load_model(f"ckpt:{workdir}/models/sl_cai")
    sampler = Sampler(model.config, model.tokenizer, mesh=None, progress=False)
    r = records[1]
    prompt = build_initial_prompt(tuple(user(t["content"]) for t in r["prompt"]), style="chat",
                                  tokenizer=model.tokenizer)
    [b] = sampler.generate(model.params, [prompt], SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8),
                           seed=config.seed, example_ids=[f"{r['id']}/b"])
    assert b.text.strip() == r["answer_b"]

    # A kill after two records: the rerun answers only the rest, identically.
    full = open(ctx.path("pairs.jsonl")).read()
    os.remove(ctx.path("pairs.jsonl"))
    with open(ctx.path("pairs.jsonl.partial"), "w") as f:
        f.write("".join(full.splitlines(keepends=True)[:2]) + '{"id": "torn')
    pairs.run_stage(ctx)
    assert open(ctx.path("pairs.jsonl")).read() == full
    assert not os.path.exists(ctx.path("pairs.jsonl.partial"))


def test_hh_rendering_stops_at_the_next_human_turn(workdir, tmp_path):
    config = make_config(render="hh")
    config.data.helpful_limit = 1
    config.pairs.red_team_limit = 1
    os.makedirs(tmp_path / "models", exist_ok=True)
    os.symlink(workdir / "models" / "sl_cai", tmp_path / "models" / "sl_cai")
    ctx = StageContext(config, str(tmp_path), mesh_from_config(config), progress=False)
    pairs.run_stage(ctx)
    for r in artifacts.read_jsonl(ctx.path("pairs.jsonl")):
        assert "\n\nHuman:" not in r["answer_a"] and "\n\nHuman:" not in r["answer_b"]
        json.dumps(r)


def test_missing_sl_cai_model_is_a_clear_error(tmp_path):
    config = make_config()
    ctx = StageContext(config, str(tmp_path), mesh_from_config(config), progress=False)
    with pytest.raises(FileNotFoundError, match="sl_train"):
        pairs.run_stage(ctx)


def test_partial_work_of_another_config_is_discarded(workdir, tmp_path):
    from cai_jax import pipeline

    config = make_config()
    config.data.red_team_limit = 1
    config.pairs.include_helpful = False
    os.makedirs(tmp_path / "models", exist_ok=True)
    os.symlink(workdir / "models" / "sl_cai", tmp_path / "models" / "sl_cai")
    bogus = {"id": "harmless:" + embedded_prompts("red_team", "train")[0].id, "kind": "harmless",
             "prompt": [{"role": "user", "content": "?"}], "answer_a": "OLD", "answer_b": "OLD",
             "finish_a": "eos", "finish_b": "eos", "sampling": {}}
    # A run of this config was killed after its first record: the pipeline keeps it, the stage resumes.
    artifacts.write_json_atomic(pipeline.started_path(str(tmp_path), "pairs"),
                                pipeline.stage_fingerprint(config, str(tmp_path), "pairs"))
    staging = pipeline.staging_dir(str(tmp_path), "pairs")
    artifacts.write_jsonl_atomic(os.path.join(staging, "pairs.jsonl.partial"), [bogus])
    pipeline.run_pipeline(config, str(tmp_path), ["pairs"], progress=False)
    [record] = artifacts.read_jsonl(str(tmp_path / "pairs.jsonl"))
    assert record["answer_a"] == "OLD"
    # Killed again, then rerun at another temperature: the old work is thrown away.
    artifacts.write_jsonl_atomic(os.path.join(staging, "pairs.jsonl.partial"), [bogus])
    config.pairs.temperature = 0.7
    pipeline.run_pipeline(config, str(tmp_path), ["pairs"], progress=False)
    [record] = artifacts.read_jsonl(str(tmp_path / "pairs.jsonl"))
    assert record["id"] == bogus["id"] and record["answer_a"] != "OLD"
    assert record["sampling"]["temperature"] == 0.7


def test_contrastive_draws_depend_only_on_seed_and_id():
    from cai_jax.constitution import load_default_constitution

    framings = load_default_constitution().contrastive_framings
    prompts = [{"id": f"harmless:{i}", "kind": "harmless"} for i in range(200)]
    drawn = [pairs.draw_construction(p, framings, seed=0) for p in prompts]
    assert drawn == [pairs.draw_construction(p, framings, seed=0) for p in prompts]
    assert drawn != [pairs.draw_construction(p, framings, seed=1) for p in prompts]
    kinds = {f.id: f.kind for f in framings}
    assert {kinds[d["framing"]] for d in drawn} == {"harmless"}
    # The better answer's slot is a fair coin, so position carries no label.
    assert 70 < sum(d["better"] == "a" for d in drawn) < 130
    # Openings: drawn from the framing's own lists, and put in the slots the
    # better and worse answers hold.
    import dataclasses
    framings = [dataclasses.replace(f, better_starts=("I can't help with that. Instead,", "I won't; what I can do is"),
                                    worse_starts=("Sure, here's how:",)) for f in framings]
    drawn = [pairs.draw_construction(p, framings, seed=0) for p in prompts]
    by_id = {f.id: f for f in framings}
    for p, d in zip(prompts, drawn):
        f = by_id[d["framing"]]
        assert d["better_start"] in f.better_starts and d["worse_start"] in f.worse_starts
        a, b = pairs.answer_starts({"construction": d})
        assert (a, b) == ((d["better_start"], d["worse_start"]) if d["better"] == "a"
                          else (d["worse_start"], d["better_start"]))
    assert len({d["better_start"] for d in drawn}) > 1
    assert pairs.answer_starts({"id": "x"}) == ("", "")
    with pytest.raises(ValueError, match="no contrastive_framings of kind 'helpful'"):
        pairs.draw_construction({"id": "h", "kind": "helpful"}, [f for f in framings if f.kind == "harmless"], 0)


def test_contrastive_stage_answers_under_each_framing_and_feedback_labels_by_construction(workdir, tmp_path):
    from cai_jax.constitution import load_default_constitution
    from cai_jax.rl_cai import feedback

    config = make_config()
    config.pairs.mode = "contrastive"
    config.feedback = feedback.get_default_config()
    config.feedback.source = "construction"
    os.makedirs(tmp_path / "models", exist_ok=True)
    os.symlink(workdir / "models" / "sl_cai", tmp_path / "models" / "sl_cai")
    ctx = StageContext(config, str(tmp_path), mesh_from_config(config), progress=False)
    summary = pairs.run_stage(ctx)
    records = artifacts.read_jsonl(ctx.path("pairs.jsonl"))
    assert summary["mode"] == "contrastive" and summary["better_in_slot_a"] == sum(
        r["construction"]["better"] == "a" for r in records)
    framings = {f.id: f for f in load_default_constitution().contrastive_framings}

    # Independently: the answer in the better slot is what the sampler writes
    # after the better framing's system message.
    model = load_model(f"ckpt:{workdir}/models/sl_cai")
    sampler = Sampler(model.config, model.tokenizer, mesh=None, progress=False)
    r = records[0]
    framing = framings[r["construction"]["framing"]]
    assert framing.kind == r["kind"]
    slot = r["construction"]["better"]
    # The answer continues the framing's drawn opening, if it has openings.
    start = r["construction"].get("better_start", "")
    assert (start in framing.better_starts) if framing.better_starts else start == ""
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": framing.better}] + r["prompt"], add_generation_prompt=True, tokenize=False)
    [better] = sampler.generate(model.params, [prompt + start],
                                SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8),
                                seed=config.seed, example_ids=[f"{r['id']}/{slot}"])
    assert (start + better.text).strip() == r[f"answer_{slot}"]
    assert r[f"answer_{slot}"].startswith(start.strip())

    summary = feedback.run_stage(ctx)
    labels = artifacts.read_jsonl(ctx.path("labels.jsonl"))
    assert summary["source"] == "construction" and summary["labels"] == len(records)
    for label, pair in zip(labels, records):
        assert label["source"] == "construction" and label["construction"] == pair["construction"]
        assert abs(label["p_a"] - (0.9 if pair["construction"]["better"] == "a" else 0.1)) < 1e-12
