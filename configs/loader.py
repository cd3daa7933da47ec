"""Config files and the command line every Loom CLI shares: loading an experiment file,
applying `--config.a.b=value` overrides, the --help table of every key, and console logging.

Only configs/base.py and ml_collections are needed here, so every layer (data/, train/) and
every CLI can use it.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ml_collections import ConfigDict

from configs.base import HELP, get_config as base_config
from errors import VERBOSE_ENV, ConfigError


def load(path: str | Path) -> ConfigDict:
    """Runs `get_config()` of a Python config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (e.g. --config configs/quickstart.py)")
    spec = importlib.util.spec_from_file_location(f"loom_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} defines no get_config()")
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as e:   # the file is the user's code: e.g. a value of the wrong type
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {path} failed: {first}") from e
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"get_config() of {path} returned a {type(cfg).__name__}, not a "
                          "ConfigDict; start from configs.base.get_config()")
    return cfg


def flat_items(cfg: ConfigDict | Mapping[str, Any], prefix: str = ""
               ) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of the config (or of a section, given its `prefix`,
    e.g. "data."), in definition order."""
    for key, value in cfg.items():
        if isinstance(value, (ConfigDict, Mapping)):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


INT_LIMIT = 2**31 - 1   # sizes, steps and seeds end up in int32 arrays and shapes
FLOAT_LIMIT = 3.4e38    # rates, scales and epsilons end up in float32 (its largest is ~3.4e38)


def number_problem(key: str, value: Any) -> str | None:
    """Why the value of a number key cannot work, whatever the key: a float that is nan, or
    infinite in float32, or an integer beyond 32 bits. None for a fine number or a non-number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT_LIMIT):
        return f"{key}={value} must be a finite (float32) number"
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        return f"{key}={value} is out of range: config integers must lie within +-{INT_LIMIT}"
    return None


def _parse(key: str, text: str, current: Any) -> Any:
    """Converts a command-line string to the type of the key's current value."""
    kind = type(current)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int:
            return int(text.replace("_", ""))
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if kind in (tuple, list):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = tuple(t for t in text.split(",") if t)  # a,b,c -> tuple of strings
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return tuple(value)
    except ValueError:
        pass
    else:
        raise ConfigError(f"config key {key} has a value of type {kind.__name__}, which cannot "
                          "be set from the command line")
    raise ConfigError(f"--config.{key}={text!r}: expected a {kind.__name__} "
                      f"(current value {current!r})")


def override(cfg: ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` from its command-line text; unknown keys name their nearest match."""
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        if not isinstance(node, ConfigDict) or part not in node:
            known = sorted(node.keys()) if isinstance(node, ConfigDict) else []
            near = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {'.'.join(parts[:depth] + near)}?" if near else ""
            where = f" in {here}" if here else ""
            raise ConfigError(f"unknown config key {key!r}{hint} (keys{where}: {', '.join(known)})")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ConfigDict):
        raise ConfigError(f"config key {key!r} is a group; set one of its keys: "
                          f"{', '.join(sorted(current.keys()))}")
    node[parts[-1]] = _parse(key, text, current)


def apply_overrides(cfg: ConfigDict, args: Sequence[str]) -> ConfigDict:
    """Applies `--config.key=value` / `--config.key value` arguments in order."""
    args = list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r}; config overrides look like "
                              "--config.opt.lr=1e-3 (see --help)")
        key, sep, text = arg[len("--config."):].partition("=")
        if not sep:
            if not args:
                raise ConfigError(f"--config.{key} needs a value, e.g. --config.{key}=VALUE")
            text = args.pop(0)
        override(cfg, key, text)
    return cfg


def help_table(cfg: ConfigDict) -> str:
    """One line per config key: name, current value, meaning."""
    rows = [(k, repr(v), HELP.get(k, "")) for k, v in flat_items(cfg) if k != "mesh.rules"]
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"  --config.{k:<{width}} {h} [{v}]" for k, v, h in rows) + \
        "\n  --config.mesh.rules           " + HELP["mesh.rules"]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
          config_required: bool = True) -> tuple[argparse.Namespace, ConfigDict | None]:
    """Adds --config to `parser`, parses, loads the config and applies --config.* overrides."""
    parser.add_argument("--config", required=config_required,
                        help="experiment file defining get_config(), e.g. configs/quickstart.py")
    add_verbose(parser)
    parser.epilog = ("config overrides (--config.KEY=VALUE; defaults of configs/base.py):\n"
                     + help_table(base_config()))
    args, rest = parser.parse_known_args(argv)
    configure_logging()
    if not args.config:
        if rest:
            raise ConfigError(f"{rest[0]!r} needs --config (or is not an option of this command)")
        return args, None
    return args, apply_overrides(load(args.config), rest)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """--verbose: an error's traceback and causes, not just its one line (errors.fail_cleanly,
    which reads it from the command line, since it wraps the parsing)."""
    parser.add_argument("--verbose", action="store_true",
                        help=f"show the traceback and cause of an error (or set {VERBOSE_ENV}=1)")


def configure_logging() -> None:
    """Console logging for a CLI: Loom's own progress (the `model`, `train` and `data` loggers)
    at INFO, each line once and from process 0 only; warnings from anywhere and any host; the
    chatter of absl (which tfds, orbax and grain log through), jax and orbax only when it is an
    error.

    Loom's loggers keep propagating to the one console handler on the root logger (basicConfig's),
    so nothing prints twice and a handler set up by someone else (an application, pytest's caplog)
    still sees every record; a root logger that already has handlers is left as it is. Calling
    it again changes nothing.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")

        def from_process_0(record: logging.LogRecord) -> bool:
            # Progress from one host, problems from all. Only asks jax once it is imported (a
            # Loom INFO line comes after jax has started, so this starts no backend early).
            jax = sys.modules.get("jax")
            return record.levelno >= logging.WARNING or jax is None or jax.process_index() == 0

        root.handlers[0].addFilter(from_process_0)
    for name in ("model", "train", "data"):
        logging.getLogger(name).setLevel(logging.INFO)
    for name in ("absl", "jax", "jaxlib", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_run(parser: argparse.ArgumentParser, argv: Sequence[str] | None
              ) -> tuple[argparse.Namespace, list[str]]:
    """For commands on a trained run: adds --workdir and --step, parses, and returns the
    --config.KEY=VALUE arguments, which override the run's saved config (train.restore)."""
    parser.add_argument("--workdir", required=True, help="directory of a training run")
    parser.add_argument("--step", default="latest",
                        help="checkpoint: latest, best (lowest eval loss) or a step number")
    add_verbose(parser)
    parser.epilog = ("overrides of the run's saved config (--config.KEY=VALUE; model keys are "
                     "fixed by the checkpoint), e.g.:\n" + "\n".join(
                         line for line in help_table(base_config()).splitlines()
                         if line.strip().startswith(("--config.data.", "--config.mesh.",
                                                     "--config.eval."))))
    parsed = parser.parse_known_args(argv)
    configure_logging()
    return parsed
