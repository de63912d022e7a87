"""SL-CAI end to end on the real SmolLM2-135M-Instruct: generate critiques and
revisions for a few red-team prompts, finetune on them, reload the model."""
import os

import numpy as np
import pytest

from cai_jax import artifacts
from cai_jax.config import load_config_module
from cai_jax.pipeline import run_pipeline
from cai_jax.sl_cai import generate, sft
from cai_jax.weights.loader import load_model

base_config = load_config_module(
    os.path.join(os.path.dirname(__file__), "..", "configs", "base.py")).base_config


def ci_config():
    """The CI-sized SL-CAI run: 2 red-team and 2 helpful prompts, one round, short
    generations, three SFT steps."""
    config = base_config()
    config.data.red_team_limit, config.data.helpful_limit = 2, 2
    config.sampling.max_new_tokens, config.sampling.batch_size = 16, 4
    config.sl_generate = generate.get_default_config()
    config.sl_generate.num_revisions = 1
    config.sl_generate.num_fewshot = 1
    config.sl_train = sft.get_default_config()
    # No held-out evaluation here (one more compilation); test_sft covers it.
    config.sl_train.update(dict(num_steps=3, batch_size=2, grad_accum_steps=1, eval_fraction=0.0,
                                max_seq_len=256))
    return config


# The README's main command runs these stages on a real model at full size in CI, and
# the tiny pipeline tests every stage in every test run.
@pytest.mark.slow
def test_sl_cai_runs_end_to_end_on_smollm2(tmp_path, smollm2):
    config = ci_config()
    rows = run_pipeline(config, str(tmp_path), stages=["sl_generate", "sl_train"], progress=False)
    assert [r["stage"] for r in rows] == ["sl_generate", "sl_train"]

    records = artifacts.read_jsonl(str(tmp_path / "sl_data.jsonl"))
    assert len(records) == 2
    for rec in records:
        assert rec["initial_answer"] and len(rec["rounds"]) == 1
        assert rec["rounds"][0]["critique_request"] and rec["rounds"][0]["revision_request"]
    assert len(artifacts.read_jsonl(str(tmp_path / "helpful_data.jsonl"))) == 2

    summary = rows[1]
    assert summary["steps"] == 3 and summary["helpful_examples"] == summary["revision_examples"]
    assert summary["revision_examples"] + summary["skipped_unrevised"] == 2
    reloaded = load_model(f"ckpt:{tmp_path / 'models' / 'sl_cai'}")
    base = smollm2
    assert reloaded.config.d_model == 576 and reloaded.tokenizer is not None
    # Finetuned: close to the base weights but not equal to them.
    diffs = [float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
             for a, b in zip(jax_leaves(reloaded.params), jax_leaves(base.params))]
    assert 0 < max(diffs) < 0.05

    # A second run finds both stages complete and skips them.
    again = run_pipeline(config, str(tmp_path), stages=["sl_generate", "sl_train"], progress=False)
    assert all(r["status"] == "skipped (complete)" for r in again)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)
