"""Loading an experiment config file, applying `--config.a.b=value` overrides, validating once."""
from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Any, Iterator, Sequence

from ml_collections import ConfigDict

from configs.base import HELP
from model.config import GENERATIVE_FAMILIES, ModelConfig, ModelConfigError
from model.sharding import MeshError, rules_from_config

# Each objective and the model family it trains (train/objectives.py implements them).
OBJECTIVE_FAMILIES = {"clm": "decoder", "mlm": "encoder", "electra": "electra",
                      "span_corruption": "encoder_decoder", "prefix_lm": "encoder_decoder"}
OBJECTIVES = tuple(OBJECTIVE_FAMILIES)
SOURCES = ("python_stdlib", "text_files", "tfds")
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A config file, key or value that cannot work; the message names it and the fix."""


def load(path: str | Path) -> ConfigDict:
    """Runs `get_config()` of a Python config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (e.g. --config configs/quickstart.py)")
    spec = importlib.util.spec_from_file_location(f"loom_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config()


def flat_items(cfg: ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of the config, in definition order."""
    for key, value in cfg.items():
        if isinstance(value, ConfigDict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: ConfigDict) -> None:
    """All cross-key checks, once at start-up, so a bad value fails before any compilation."""
    unknown = [k for k, _ in flat_items(cfg) if k not in HELP]
    _check(not unknown, f"unknown config keys {unknown}; every key must be one of configs/base.py")
    try:
        model = ModelConfig.from_mapping(cfg.model, vocab_size=cfg.model.vocab_size or 1)
        rules_from_config(cfg.mesh.rules)
    except (ModelConfigError, MeshError) as e:
        raise ConfigError(str(e)) from None
    data, opt, train = cfg.data, cfg.opt, cfg.train
    from data.pipeline import check_config   # data keys are checked by the code that uses them
    check_config(data)
    _check(data.source in SOURCES, f"data.source={data.source!r}: choose one of {SOURCES}")
    _check(data.source != "text_files" or bool(data.paths),
           "data.source=text_files needs data.paths, e.g. --config.data.paths='docs/*.txt'")
    _check(data.source != "tfds" or bool(data.tfds_name),
           "data.source=tfds needs data.tfds_name, e.g. --config.data.tfds_name=lm1b")
    for key in ("seq_len", "batch_size"):
        _check(data[key] > 0, f"data.{key} must be positive, got {data[key]}")
    _check(data.seq_len <= model.max_len or model.pos == "rope",
           f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}, the longest "
           f"sequence {model.pos} positions support")
    _check(0 <= data.validation_percent < 100, "data.validation_percent must be in [0, 100)")
    _check(opt.schedule in SCHEDULES, f"opt.schedule={opt.schedule!r}: choose one of {SCHEDULES}")
    _check(opt.lr > 0, f"opt.lr must be positive, got {opt.lr}")
    _check(opt.grad_accum >= 1, f"opt.grad_accum must be >= 1, got {opt.grad_accum}")
    _check(data.batch_size % opt.grad_accum == 0,
           f"data.batch_size={data.batch_size} must be divisible by opt.grad_accum="
           f"{opt.grad_accum}")
    _check(0 <= opt.warmup_steps, "opt.warmup_steps must be >= 0")
    _check(0 <= opt.min_lr_ratio <= 1, "opt.min_lr_ratio must be in [0, 1]")
    _check(train.objective in OBJECTIVES,
           f"train.objective={train.objective!r}: choose one of {OBJECTIVES}")
    family = OBJECTIVE_FAMILIES[train.objective]
    _check(model.family == family,
           f"train.objective={train.objective!r} trains a model.family={family!r} model, not "
           f"model.family={model.family!r}; set --config.model.family={family}, or an objective "
           f"for {model.family!r} models: "
           f"{', '.join(o for o, f in OBJECTIVE_FAMILIES.items() if f == model.family)}")
    _check(model.family in GENERATIVE_FAMILIES or not cfg.eval.sample_prompt,
           "eval.sample_prompt is for the families that generate (decoder, encoder_decoder); "
           f"a {model.family!r} model prints no text sample, so set "
           "--config.eval.sample_prompt=''")
    _check(train.steps > 0, f"train.steps must be positive, got {train.steps}")
    _check(train.log_every > 0, f"train.log_every must be positive, got {train.log_every}")
    _check(cfg.eval.every >= 0 and cfg.eval.steps > 0, "eval.every must be >= 0, eval.steps > 0")
    _check(cfg.ckpt.every >= 0, "ckpt.every must be >= 0")
    _check(cfg.ckpt.keep >= 1, f"ckpt.keep must be >= 1, got {cfg.ckpt.keep}")
    _check(cfg.ckpt.keep_best >= 0, f"ckpt.keep_best must be >= 0, got {cfg.ckpt.keep_best}")


def help_table(cfg: ConfigDict) -> str:
    """One line per config key: name, current value, meaning."""
    rows = [(k, repr(v), HELP.get(k, "")) for k, v in flat_items(cfg) if k != "mesh.rules"]
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"  --config.{k:<{width}} {h} [{v}]" for k, v, h in rows) + \
        "\n  --config.mesh.rules           " + HELP["mesh.rules"]
