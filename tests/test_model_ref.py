"""Model references resolve in one place; model directories carry their about.json."""
import json
import os

import pytest

from cai_jax.config import load_config_module
from cai_jax.model_ref import record_rl_checkpoint, resolve
from cai_jax.weights.loader import load_model
from cai_jax.weights.model_dir import save_model_dir

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture(scope="module")
def config():
    return load_config_module(os.path.join(CONFIGS, "tiny.py")).get_config()


@pytest.fixture(scope="module")
def tiny():
    return load_model("init:tiny", to_device=False)


def _save(path, model, about=None):
    save_model_dir(str(path), model.config, model.params, model.tokenizer, about=about)


def test_base_is_the_config_model(config):
    ref = resolve("base", config)
    assert ref.source == "init:tiny" and dict(ref.overrides)["dtype"] == "float32"


def test_run_models_resolve_in_the_workdir_and_say_which_stage_makes_them(config, tiny, tmp_path):
    for spec, stage in (("sl_cai", "sl_train"), ("pm", "pm_train"), ("rl_cai", "ppo")):
        with pytest.raises(FileNotFoundError, match=f"run the {stage} stage first"):
            resolve(spec, config, str(tmp_path))
    with pytest.raises(ValueError, match="needs a work directory"):
        resolve("sl_cai", config)
    _save(tmp_path / "models" / "sl_cai", tiny)
    for step in (2, 10, 20):
        _save(tmp_path / "models" / "rl_cai" / f"step_{step}", tiny)
    for step in (2, 10):  # step_20 was saved but not recorded: a killed save, not a checkpoint
        record_rl_checkpoint(str(tmp_path / "models" / "rl_cai"), step,
                             str(tmp_path / "models" / "rl_cai" / f"step_{step}"))
    assert resolve("sl_cai", config, str(tmp_path)).source == f"ckpt:{tmp_path}/models/sl_cai"
    assert resolve("rl_cai", config, str(tmp_path)).source == f"ckpt:{tmp_path}/models/rl_cai/step_10"
    assert resolve("rl_cai/step_2", config, str(tmp_path)).source.endswith("rl_cai/step_2")
    with pytest.raises(FileNotFoundError, match=r"records steps \[2, 10\]"):
        resolve("rl_cai/step_20", config, str(tmp_path))
    with pytest.raises(ValueError, match="step_K with K a number"):
        resolve("rl_cai/step_x", config, str(tmp_path))


def test_weights_sources_pass_through_and_unknown_names_list_the_choices(config):
    for spec in ("smollm2", "qwen2.5-coder-0.5b-instruct", "init:tiny", "gguf:/x.gguf", "hf:/d", "ckpt:/d"):
        assert resolve(spec, config).source == spec
    with pytest.raises(ValueError, match="base, sl_cai, pm, rl_cai"):
        resolve("models/sl_cai", config)


def test_about_travels_with_the_model_and_version_follows_the_weights(config, tiny, tmp_path):
    _save(tmp_path / "models" / "pm", tiny, about={"render": "hh", "max_seq_len": 320})
    ref = resolve("pm", config, str(tmp_path))
    assert ref.load(to_device=False).about == {"render": "hh", "max_seq_len": 320}
    before = ref.version(0)
    # Saved again, the same weights (under new random orbax file names): the
    # same version, so caches keyed on it stay valid; other weights: another.
    _save(tmp_path / "models" / "pm", tiny, about={"render": "hh", "max_seq_len": 320})
    assert ref.version(0) == before and ref.version(0) != ref.version(1)
    changed = tiny.params.copy()
    changed["final_norm"] = {"scale": tiny.params["final_norm"]["scale"] * 2}
    save_model_dir(str(tmp_path / "models" / "pm"), tiny.config, changed, tiny.tokenizer,
                   about={"render": "hh", "max_seq_len": 320})
    assert ref.version(0) != before


def test_preference_json_of_older_runs_is_still_read(tiny, tmp_path):
    _save(tmp_path / "pm", tiny)
    os.remove(tmp_path / "pm" / "about.json")
    with open(tmp_path / "pm" / "preference.json", "w") as f:
        json.dump({"render": "hh"}, f)
    assert load_model(f"ckpt:{tmp_path / 'pm'}", to_device=False).about == {"render": "hh"}
