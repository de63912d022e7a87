"""Runs the Constitutional AI pipeline.

    python -m cai_jax.main --config=configs/default.py --workdir=runs/default
    python -m cai_jax.main --config=configs/default.py --workdir=DIR --stages=sl_generate,sl_train
    python -m cai_jax.main --config=configs/default.py --config.model.name=810m ...

Stages run in recipe order (sl_generate, sl_train, pairs, feedback, pm_train,
ppo, eval); complete stages are skipped, a killed stage resumes.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from cai_jax import distributed, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: all artifacts go here")
_STAGES = flags.DEFINE_list("stages", None, f"subset of {list(pipeline.ORDER)} (default: all)")
_FORCE = flags.DEFINE_bool("force", False, "rerun stages even when their artifacts are complete")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
    config = _CONFIG.value
    distributed.maybe_initialize(config)
    rows = pipeline.run_pipeline(config, _WORKDIR.value, _STAGES.value, progress=_PROGRESS.value,
                                 force=_FORCE.value)
    print(pipeline.format_summary(rows))


if __name__ == "__main__":
    app.run(main)
