"""Experiment configs: overrides, the size ladder, and clear errors."""
import pytest

from cai_jax.config import load_config, resolve_model
from cai_jax.models.config import MODEL_LADDER, model_config_from_dict


def test_overrides_apply_and_resolve():
    config = load_config("configs/base.py", ["model.name=810m", "model.num_layers=4", "mesh.fsdp=2"])
    source, overrides = resolve_model(config.model)
    assert source == "init:810m"
    cfg = model_config_from_dict({"name": "810m", **overrides})
    assert cfg.num_layers == 4 and cfg.d_model == 2048 and config.mesh.fsdp == 2


def test_default_model_is_the_bundled_smollm2():
    assert resolve_model(load_config("configs/base.py").model)[0] == "smollm2"


@pytest.mark.parametrize("override, message", [
    ("model.num_lyers=4", "num_layers"),            # unknown key, with a suggestion
    ("model.num_layers=four", "invalid literal"),   # wrong type
    ("mesh.data=x", "invalid literal"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(BaseException, match=message):
        load_config("configs/base.py", [override])


def test_unknown_model_name():
    config = load_config("configs/base.py", ["model.name=huge"])
    with pytest.raises(ValueError, match="known"):
        resolve_model(config.model)


def test_paper_ladder_sizes():
    # Nominal sizes count non-embedding weights (12 * layers * d_model^2 style).
    for name, nominal in [("810m", 0.81e9), ("1.6b", 1.6e9), ("3.5b", 3.5e9), ("6.4b", 6.4e9),
                          ("13b", 13e9), ("22b", 22e9), ("52b", 52e9)]:
        cfg = model_config_from_dict({"name": name})
        non_embedding = cfg.num_params() - 2 * cfg.vocab_size * cfg.d_model
        assert abs(non_embedding / nominal - 1) < 0.05, (name, non_embedding)
    assert MODEL_LADDER["52b"]["num_layers"] == 64 and MODEL_LADDER["52b"]["d_model"] == 8192


def test_model_field_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        model_config_from_dict({"name": "tiny", "num_kv_heads": 3})
    with pytest.raises(ValueError, match="not a model field"):
        model_config_from_dict({"name": "tiny", "hidden": 3})


def test_the_reproduce_config_grows_the_default_and_changes_nothing_else():
    """configs/reproduce.py differs from the default only in size, so the two
    runs' results can be compared (experiments/results/reproduce/README.md)."""
    default = load_config("configs/default.py").to_dict()
    reproduce = load_config("configs/reproduce.py").to_dict()

    def flat(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    default, reproduce = dict(flat(default)), dict(flat(reproduce))
    assert default.keys() == reproduce.keys()
    changed = {k for k in default if default[k] != reproduce[k]}
    assert changed == {
        "sl_generate.red_team_limit", "sl_generate.helpful_limit", "sl_generate.num_revisions",
        "pairs.red_team_limit", "ppo.iterations", "ppo.save_every", "ppo.eval_prompts",
        "eval.red_team_limit", "eval.helpful_limit", "eval.n_bootstrap"}
    assert reproduce["sl_generate.num_revisions"] == 4  # the paper's
    assert reproduce["ppo.iterations"] % reproduce["ppo.save_every"] == 0
