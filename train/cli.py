"""What every `python -m train...` command shares: --config + overrides, --help listing every
config key, and turning bad input into one clear line instead of a traceback."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator, Sequence

from ml_collections import ConfigDict

from configs.base import get_config as base_config
from data.sources import DataError
from model.config import ModelConfigError
from model.sharding import MeshError
from train.checkpoint import CheckpointError
from train.config import ConfigError, apply_overrides, help_table, load

USER_ERRORS = (ConfigError, DataError, CheckpointError, MeshError, ModelConfigError)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
          config_required: bool = True) -> tuple[argparse.Namespace, ConfigDict | None]:
    """Adds --config to `parser`, parses, loads the config and applies --config.* overrides."""
    parser.add_argument("--config", required=config_required,
                        help="experiment file defining get_config(), e.g. configs/quickstart.py")
    parser.epilog = ("config overrides (--config.KEY=VALUE; defaults of configs/base.py):\n"
                     + help_table(base_config()))
    args, rest = parser.parse_known_args(argv)
    quiet_libraries()
    if not args.config:
        if rest:
            raise ConfigError(f"{rest[0]!r} needs --config (or is not an option of this command)")
        return args, None
    return args, apply_overrides(load(args.config), rest)


def quiet_libraries() -> None:
    """Loom's own progress at INFO; tfds/orbax/absl chatter only when it is an error."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("model", "train", "data"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)


def parse_run(parser: argparse.ArgumentParser, argv: Sequence[str] | None
              ) -> tuple[argparse.Namespace, list[str]]:
    """For commands on a trained run: adds --workdir and --step, parses, and returns the
    --config.KEY=VALUE arguments, which override the run's saved config (train.restore)."""
    parser.add_argument("--workdir", required=True, help="directory of a training run")
    parser.add_argument("--step", default="latest",
                        help="checkpoint: latest, best (lowest eval loss) or a step number")
    parser.epilog = ("overrides of the run's saved config (--config.KEY=VALUE; model keys are "
                     "fixed by the checkpoint), e.g.:\n" + "\n".join(
                         line for line in help_table(base_config()).splitlines()
                         if line.strip().startswith(("--config.data.", "--config.mesh.",
                                                     "--config.eval."))))
    parsed = parser.parse_known_args(argv)
    quiet_libraries()
    return parsed


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Exits with status 2 and a one-line message for input errors."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
