"""Fields every experiment shares. Experiment files start from `base_config()`."""
import ml_collections

from cai_jax import config as cfg_lib


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = cfg_lib.model_section("smollm2-135m")
    config.mesh = cfg_lib.mesh_section()
    return config


def get_config():
    config = base_config()
    config.lock()
    return config
