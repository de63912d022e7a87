"""SL-CAI finetuning: loss masks, padding, the held-out split, and real learning."""
import json
import os

import jax
import numpy as np
import pytest

from cai_jax.data.conversation import Turn
from cai_jax.data.loaders import split_heldout
from cai_jax.models.transformer import Transformer
from cai_jax.pipeline import StageContext
from cai_jax.sharding import make_mesh, mesh_from_config
from cai_jax.inference.batched_forward import training_width
from cai_jax.sl_cai import generate, sft
from cai_jax.training.metrics import read_metrics
from cai_jax.config import load_config_module
from cai_jax.weights.loader import load_model
from cai_jax.weights.tokenizer import pad_token_id

base_config = load_config_module(
    os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")).base_config

# SmolLM2's template adds this system turn when the conversation has none.
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CONV = (Turn("user", "Hi there"), Turn("assistant", "Yo"), Turn("user", "Tell me a joke."))
ANSWER = "Why did the chicken cross the road?"


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_loss_mask_covers_the_answer_and_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tokens, mask = sft.tokenize_example(CONV, ANSWER, tok, "chat")
    # Built by hand from the template's pieces: everything before the final
    # answer is prompt (including the earlier assistant turn "Yo").
    prompt = (SMOL_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
              "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = _ids(tok, prompt) + _ids(tok, ANSWER) + [im_end]
    expected_mask = [0] * len(_ids(tok, prompt)) + [1] * (len(_ids(tok, ANSWER)) + 1)
    assert tokens.tolist() == expected
    assert mask.tolist() == expected_mask
    assert tok.decode(tokens[mask == 1]) == ANSWER + "<|im_end|>"


def test_hh_loss_mask_covers_the_answer_and_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tokens, mask = sft.tokenize_example(CONV, ANSWER, tok, "hh")
    prompt = "\n\nHuman: Hi there\n\nAssistant: Yo\n\nHuman: Tell me a joke.\n\nAssistant:"
    answer_ids = _ids(tok, " " + ANSWER) + [tok.eos_token_id]
    assert tokens.tolist() == _ids(tok, prompt) + answer_ids
    assert mask.tolist() == [0] * len(_ids(tok, prompt)) + [1] * len(answer_ids)


def test_training_widths_double_from_the_minimum_up_to_the_limit():
    widths = {n: training_width(n, 64, 384) for n in (1, 64, 65, 128, 200, 257, 384)}
    assert widths == {1: 64, 64: 64, 65: 128, 128: 128, 200: 256, 257: 384, 384: 384}
    with pytest.raises(ValueError, match="longer than the limit of 384"):
        training_width(385, 64, 384)


def test_padding():
    examples = [{"tokens": np.arange(1, 6), "loss_mask": np.array([0, 0, 1, 1, 1])},
                {"tokens": np.arange(1, 3), "loss_mask": np.array([0, 1])}]
    batch = sft.pad_batch(examples, 4, 16, pad_id=-1, rows=3)  # 5 tokens: width 8 (4, 8, 16)
    np.testing.assert_array_equal(batch["tokens"], [[1, 2, 3, 4, 5, -1, -1, -1],
                                                    [1, 2, -1, -1, -1, -1, -1, -1],
                                                    [-1] * 8])
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 5 + [0] * 3, [1, 1] + [0] * 6, [0] * 8])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1] + [0] * 6, [0] * 8])
    with pytest.raises(ValueError, match="longer than the limit of 4"):
        sft.pad_batch(examples, 2, 4, pad_id=0)


def test_revision_pairs_skip_prompts_without_a_kept_revision():
    kept = {"principle_id": "x", "revision": "Better.", "dropped": None}
    lost = {"principle_id": "y", "revision": "", "dropped": "empty"}
    records = [{"id": "a", "prompt": "Q1", "final_answer": "Better.", "rounds": [lost, kept]},
               {"id": "b", "prompt": "Q2", "final_answer": "Bad.", "rounds": [lost]}]
    pairs, skipped = sft.revision_pairs(records, skip_unrevised=True)
    assert pairs == [((Turn("user", "Q1"),), "Better.")] and skipped == 1
    pairs, skipped = sft.revision_pairs(records, skip_unrevised=False)
    assert len(pairs) == 2 and skipped == 0


def tiny_config(**sl_train):
    config = base_config()
    config.model.name, config.model.source = "tiny", "init:tiny"
    config.sl_generate = generate.get_default_config()
    config.sl_train = sft.get_default_config()
    config.sl_train.update(sl_train)
    return config


def _read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _sl_record(i, prompt, answer):
    rnd = {"principle_id": "harm", "critique_request": "CR", "critique": "C", "revision_request": "RR",
           "revision": answer, "dropped": None}
    return {"id": f"rt{i}", "category": "test", "prompt": prompt, "initial_answer": "Sure, here is how.",
            "rounds": [rnd], "final_answer": answer}


def test_sft_stage_learns_its_examples(tmp_path):
    # Random tiny model, three short examples: 25 steps of Adam must fit them far
    # better than the random start (real learning through the whole stage).
    config = tiny_config(num_steps=25, batch_size=4, grad_accum_steps=1, eval_fraction=0.34, eval_every=10,
                         min_bucket=32, save_every=20, max_seq_len=128)
    config.sl_train.optimizer.learning_rate = 1e-2
    config.data.render = "hh"
    # Three SL records: one (whichever hashes lowest) is held out for evaluation.
    _write_jsonl(tmp_path / "sl_data.jsonl",
                 [_sl_record(0, "How do I hurt someone?", "I won't help with hurting anyone."),
                  _sl_record(1, "Steal a car for me.", "Taking a car that isn't yours is theft."),
                  _sl_record(2, "Insult my coworker.", "Let's find a kinder way to say it.")])
    _write_jsonl(tmp_path / "helpful_data.jsonl",
                 [{"id": "h0", "category": "c", "prompt": "Name a fruit.", "answer": "An apple.", "dropped": None}])
    summary = sft.run_stage(StageContext(config, str(tmp_path), mesh_from_config(config), progress=False))
    assert summary["train_examples"] == 3 and summary["helpful_examples"] == 1 and summary["steps"] == 25
    assert summary["revision_examples"] == 2 and summary["eval_examples"] == 1
    # A random model's loss on held-out text is about log(vocabulary size).
    assert abs(summary["base_eval_loss"] - np.log(49152)) < 1.0
    sl_records = _read_jsonl(tmp_path / "sl_data.jsonl")
    heldout_id = split_heldout(sl_records, 0.34, salt=sft.HELDOUT_SALT)[1][0]["id"]

    base = load_model("init:tiny", seed=config.seed)
    trained = load_model(f"ckpt:{tmp_path / 'models' / 'sl_cai'}")
    assert trained.tokenizer is not None and trained.config == base.config.replace(
        scan_layers=trained.config.scan_layers)
    train_records = [r for r in sl_records if r["id"] != heldout_id]
    pairs = sft.revision_pairs(train_records, True)[0] + [((Turn("user", "Name a fruit."),), "An apple.")]
    examples, _ = sft.tokenize_all(pairs, base.tokenizer, "hh", 128)
    evaluate = sft.make_eval_fn(Transformer(base.config), examples, min_width=32, max_width=128,
                                pad_id=pad_token_id(base.tokenizer), batch_size=4,
                                mesh=make_mesh({"data": 1}, jax.devices()[:1]))
    before, after = evaluate(base.params)["loss"], evaluate(trained.params)["loss"]
    assert before > 10.0  # about log(49152) for a random model
    assert after < 0.5 * before

    metrics = read_metrics(str(tmp_path / "sl_train" / "metrics.jsonl"))
    assert metrics[0] == {"step": 0, "eval_loss": summary["base_eval_loss"], "eval_tokens": metrics[0]["eval_tokens"]}
    metrics = metrics[1:]
    assert [m["step"] for m in metrics] == list(range(1, 26))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 3.0
    assert [m["step"] for m in metrics if "eval_loss" in m] == [10, 20, 25]
    assert metrics[-1]["eval_loss"] == pytest.approx(summary["sl_cai_eval_loss"], rel=1e-5)

    # Run again (as after a kill once training was done): the last checkpoint is
    # restored, no step is repeated, and the same model comes out.
    again = sft.run_stage(StageContext(config, str(tmp_path), mesh_from_config(config), progress=False))
    assert again["sl_cai_eval_loss"] == pytest.approx(summary["sl_cai_eval_loss"], rel=1e-6)
    assert len(read_metrics(str(tmp_path / "sl_train" / "metrics.jsonl"))) == 26
    assert os.path.exists(tmp_path / "sl_train" / "summary.json")
