"""The command line shared by the trainers and the evaluator:

    python -m transfusion_jax.X --config experiments/Y.py[:arg] --workdir DIR [--config.key=value]

Flags are defined when a program starts (`run`), never on import: the library's modules can all
be imported into one process (tests, notebooks) without absl's duplicate-flag errors.

The console shows the progress lines and warnings; absl's and Orbax's INFO lines (one per
checkpoint file, handler and thread) come back with `--verbosity=0` (or `-v 1` for debug).
"""
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from transfusion_jax.core.checkpoint import StorageError


def _parse(argv):
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: unknown key in an override
        message = str(e.args[0]).strip("'").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"error: bad --config override: unknown key {message}")


def quiet_logs() -> None:
    """absl (and Orbax through it) log WARNING and above, unless --verbosity was given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_flags(main: Callable[[], None]) -> None:
    """app.run for a program that defines its own flags; quiet logs, `error: ...` on a
    ValueError, FileNotFoundError, FloatingPointError or a checkpoint StorageError."""
    def _main(argv):
        del argv
        quiet_logs()
        try:
            main()
        except (ValueError, FileNotFoundError, FloatingPointError, StorageError) as e:
            sys.exit(f"error: {e}")

    app.run(_main, flags_parser=_parse)


def run(main: Callable, config_help: str, define_extra: Callable[[], dict] | None = None):
    """Defines --config, --workdir (and the extras), then calls main(config, workdir, extras)
    with the extra flags' values (the config after its --config.key=value overrides)."""
    config = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go")
    extra = define_extra() if define_extra else {}

    def _main():
        if config.value is None or not workdir.value:
            sys.exit("error: --config and --workdir are required")
        main(config.value, workdir.value, {k: v.value for k, v in extra.items()})

    run_flags(_main)
