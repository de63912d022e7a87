"""Fields every experiment shares. Experiment files start from `base_config()` and
add the stage sections (each stage module owns its defaults)."""
import ml_collections
from ml_collections import config_dict

from cai_jax import config as cfg_lib


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # The helpful model every stage starts from (and the feedback model by default).
    config.model = cfg_lib.model_section("smollm2-135m")
    config.mesh = cfg_lib.mesh_section()
    # "default" (our constitution), a path to a constitution JSON, or "paper:DIR"
    # for the paper's supplementary prompt files. num_principles keeps a seeded
    # subset (the paper's figure 6 ablation); None keeps all.
    config.constitution = ml_collections.ConfigDict({
        "path": "default", "num_principles": config_dict.placeholder(int)})
    # Prompt sources: "embedded" (shipped with the package) or an HH-format file
    # (.jsonl/.jsonl.gz with chosen/rejected). Limits of 0 mean "all".
    config.data = ml_collections.ConfigDict({
        "red_team": "embedded", "helpful": "embedded", "red_team_limit": 0, "helpful_limit": 0,
        "on_error": "raise",
        # How conversations are shown to models: "chat" (the tokenizer's chat
        # template) or "hh" (the paper's raw "\n\nHuman: ... \n\nAssistant:" text).
        "render": "chat"})
    # Default sampling settings for generation stages.
    config.sampling = ml_collections.ConfigDict({
        "temperature": 1.0, "top_k": 0, "top_p": 0.95, "max_new_tokens": 128, "batch_size": 16,
        # Compute the start that prompts share (few-shot exemplars, system
        # messages, chat headers) once per batch; the answers are the same
        # within float rounding (inference/prefix_groups.py).
        "shared_prefix": True})
    # Multi-host runs (one process per host). A process silent for
    # heartbeat_timeout_seconds is lost: the others stop with one line naming it.
    config.distributed = ml_collections.ConfigDict({
        "enabled": False, "coordinator_address": "", "num_processes": 0, "process_id": -1,
        "heartbeat_timeout_seconds": 60})
    return config


def experiment_config() -> ml_collections.ConfigDict:
    """The shared sections plus every stage's own defaults (unlocked)."""
    from cai_jax.eval import evaluate
    from cai_jax.rl_cai import feedback, pairs, ppo, preference
    from cai_jax.sl_cai import generate, sft

    config = base_config()
    config.sl_generate = generate.get_default_config()
    config.sl_train = sft.get_default_config()
    config.pairs = pairs.get_default_config()
    config.feedback = feedback.get_default_config()
    config.pm_train = preference.get_default_config()
    config.ppo = ppo.get_default_config()
    config.eval = evaluate.get_default_config()
    return config


def get_config():
    """Model and mesh only: enough for tools such as aot and score_pairs."""
    config = base_config()
    config.lock()
    return config
