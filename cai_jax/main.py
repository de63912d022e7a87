"""Runs the Constitutional AI pipeline.

    python -m cai_jax.main --config=configs/default.py --workdir=runs/default
    python -m cai_jax.main --config=configs/default.py --workdir=DIR --stages=sl_generate,sl_train
    python -m cai_jax.main --config=configs/default.py --config.model.name=810m ...

Stages run in recipe order (sl_generate, sl_train, pairs, feedback, pm_train,
ppo, eval); complete stages are skipped, a killed stage resumes. The whole
config is checked before the first stage; a user error (bad config, command
line or data) prints one line `error: ...` and exits with status 2. Ctrl-C or
SIGTERM stops the run with one line and status 130 or 143 (interrupts.py).
"""
if __name__ == "__main__":  # first, so the re-run starts before jax is imported
    from cai_jax import interrupts
    from cai_jax.errors import exit_on_user_error
    from cai_jax.huge_pages import rerun_with_huge_pages
    exit_on_user_error(rerun_with_huge_pages)  # a bad $CAI_JAX_HUGE_PAGES is one line
    interrupts.install()  # before the slow imports: Ctrl-C from here on is one line

from absl import app, flags, logging
from ml_collections import config_flags

from cai_jax import config_checks, distributed, errors, interrupts, pipeline, processes
from cai_jax.compile_cache import enable_compilation_cache
from cai_jax.config import parse_config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: all artifacts go here")
_STAGES = flags.DEFINE_list("stages", None, f"subset of {list(pipeline.ORDER)} (default: all)")
_FORCE = flags.DEFINE_bool("force", False, "rerun stages even when their artifacts are complete")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")
_DEBUG = flags.DEFINE_bool("debug", False, "show the traceback of a user error too")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's flag parsing, with a bad flag or config override as one line and exit 2."""
    return errors.exit_on_user_error(parse_config_flags, flags.FLAGS, argv)


def run(argv):
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
    config = _CONFIG.value
    enable_compilation_cache()  # before anything compiles
    distributed.maybe_initialize(config)
    config_checks.check_config(config)  # after initialize: the mesh check counts all devices
    # After initialize too: the run's mesh (pipeline.run_mesh) spans every process's devices.
    rows = pipeline.run_pipeline(config, _WORKDIR.value, _STAGES.value, progress=_PROGRESS.value,
                                 force=_FORCE.value)
    print(pipeline.format_summary(rows))


def main(argv):
    # In a multi-process run a process that stops on an error takes the others with it (processes.py).
    processes.run_and_report(interrupts.call, errors.exit_on_user_error, run, argv, debug=_DEBUG.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
