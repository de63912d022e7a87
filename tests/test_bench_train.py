"""The train-step bench: its shapes and arithmetic, and a --quick run on the tiny
model whose first-step losses must match transformers + torch (no timings asserted)."""
import importlib.util
import json
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_train.py")
spec = importlib.util.spec_from_file_location("bench_train", _PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_train"] = bench  # its dataclasses look their module up
spec.loader.exec_module(bench)

CONFIGS = os.path.join(os.path.dirname(_PATH), "..", "configs")


def test_default_shapes_come_from_the_default_run_config():
    from cai_jax.config import load_config
    args = bench.parse_args([])
    config = load_config(os.path.join(CONFIGS, "default.py"))
    got = {(s.kind, s.label, s.tokens) for s in bench.shapes(args, config, 8192)}
    assert got == {("sft", "8 x 384, 2 micro-batches", 3072), ("sft", "2 x 1024, 2 micro-batches", 2048),
                   ("pm", "4 pairs x 320", 2560), ("pm", "1 pair x 1024", 2048),
                   ("ppo_policy", "4 x (128 + 48)", 704), ("ppo_value", "4 x (128 + 48)", 704),
                   ("ppo_shared", "4 x (128 + 48)", 704)}


def test_flops_count_the_lm_head_only_where_the_loss_reads_it():
    from cai_jax.models.config import MODEL_LADDER, TransformerConfig
    cfg = TransformerConfig(**MODEL_LADDER["smollm2-135m"])
    trunk, head = bench.matmul_params(cfg)
    assert trunk + head + 61 * cfg.d_model == cfg.num_params()  # the rest: 61 norm scales
    ppo = bench.Shape("ppo_policy", 4, 176, answer=48)
    assert bench.step_flops(ppo, cfg) == 6 * (trunk * 704 + head * 4 * 48)
    assert bench.step_flops(bench.Shape("pm", 4, 320), cfg) == 6 * trunk * 2560


def test_append_replaces_a_cell_of_the_same_step_and_shape(tmp_path):
    old = [{"kind": "sft", "shape": "a", "v": 1}, {"kind": "pm", "shape": "b", "v": 1}]
    (tmp_path / "r.json").write_text(json.dumps({"cells": old}))
    new = [{"kind": "pm", "shape": "b", "v": 2}]
    assert bench.merged(str(tmp_path / "r.json"), new) == [old[0], new[0]]
    assert [c["kind"] for c in bench.merged(str(tmp_path / "r.json"), [{"kind": "sft", "shape": "c"}])] == [
        "sft", "sft", "pm"]


def quick_run(tmp_path, cells: str) -> list[dict]:
    """bench_train --quick on the tiny model; checks the losses and the files it writes."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = bench.main(["--config", os.path.join(CONFIGS, "tiny.py"), "--quick", "--out_dir", str(tmp_path),
                      "--name", "run", "--cells", cells, "--sft_len", "64", "--pm_len", "64",
                      "--ppo_prompt", "24", "--ppo_new", "8", "--peak_size", "256"])
    cells = out["cells"]
    for c in cells:
        assert c["first_loss_rel_diff"] < 1e-4, c  # the two sides run the same step
        assert c["second_loss_rel_diff"] < 1e-3, c  # ... and the same update
    text = (tmp_path / "run.md").read_text()
    for c in cells:
        assert bench.row(c) in text
    saved = json.loads((tmp_path / "run.json").read_text())
    assert [(c["kind"], c["shape"]) for c in saved["cells"]] == [(c["kind"], c["shape"]) for c in cells]
    return cells


def test_quick_run_on_the_tiny_model_matches_torch(tmp_path):
    cells = quick_run(tmp_path, "sft,pm,ppo_shared")  # ppo_shared: both PPO losses
    assert [(c["kind"], c["shape"]) for c in cells] == [
        ("sft", "2 x 64, 2 micro-batches"), ("pm", "2 pairs x 64"), ("ppo_shared", "2 x (24 + 8)")]


@pytest.mark.slow
def test_separate_ppo_policy_and_value_steps_match_torch(tmp_path):
    cells = quick_run(tmp_path, "ppo_policy,ppo_value")
    assert [c["kind"] for c in cells] == ["ppo_policy", "ppo_value"]
