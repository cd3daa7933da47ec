"""Validating a resolved config once, before any tokenizer is trained or array allocated.

Loading a config file and applying `--config.a.b=value` overrides is configs/loader.py's job;
each key's default and meaning are stated once, in configs/base.py.
"""
from __future__ import annotations

from typing import Sequence

import jax
from ml_collections import ConfigDict

from configs.base import HELP
from configs.loader import flat_items, number_problem
from data import config as data_config
from errors import ConfigError, MeshError
from model.config import ModelConfig
from model.sharding import MESH_AXES, batch_divisor, mesh_shape, rules_from_config
from train import families

SCHEDULES = ("cosine", "linear", "constant")


def _check(ok: bool, message: str, error: type[ConfigError] = ConfigError) -> None:
    if not ok:
        raise error(message)


def validate(cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """Every cross-key check, so a bad value fails before a corpus is read or anything
    compiles. `devices` (default: all) are the ones the mesh will span."""
    unknown = [k for k, _ in flat_items(cfg) if k not in HELP]
    _check(not unknown, f"unknown config keys {unknown}; every key must be one of configs/base.py")
    for key, value in flat_items(cfg):
        problem = number_problem(key, value)
        _check(problem is None, problem or "")
    data, opt, train = cfg.data, cfg.opt, cfg.train
    objective = families.objective(train.objective)
    _check(cfg.model.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 = the tokenizer's "
           f"size), got {cfg.model.vocab_size}")
    model = ModelConfig.from_mapping(cfg.model, vocab_size=cfg.model.vocab_size or 1)
    family = families.family(model)
    _check(model.family == objective.family,
           f"train.objective={train.objective!r} trains a model.family={objective.family!r} "
           f"model, not model.family={model.family!r}; set --config.model.family="
           f"{objective.family}, or an objective for {model.family!r} models: "
           f"{', '.join(families.objectives_of(model.family))}")
    data_config.check(data, train.objective)
    _check_lengths(cfg, model)
    _check(train.objective != "mlm" or data.mlm.sentence_pairs == "none"
           or model.type_vocab_size != 1,
           f"data.mlm.sentence_pairs={data.mlm.sentence_pairs!r} marks sentence B with token "
           "type 1, but model.type_vocab_size=1 has only type 0; set it to 2 (or 0 = no types)")
    _check(opt.schedule in SCHEDULES, f"opt.schedule={opt.schedule!r}: choose one of {SCHEDULES}")
    _check(opt.lr > 0, f"opt.lr must be positive, got {opt.lr}")
    _check(opt.grad_accum >= 1, f"opt.grad_accum must be >= 1, got {opt.grad_accum}")
    _check(data.batch_size % opt.grad_accum == 0,
           f"data.batch_size={data.batch_size} must be divisible by opt.grad_accum="
           f"{opt.grad_accum}")
    _check(0 <= opt.warmup_steps, f"opt.warmup_steps must be >= 0, got {opt.warmup_steps}")
    _check(0 <= opt.min_lr_ratio <= 1, f"opt.min_lr_ratio must be in [0, 1], got "
           f"{opt.min_lr_ratio}")
    for key in ("b1", "b2"):
        _check(0 <= opt[key] < 1, f"opt.{key} must be in [0, 1), got {opt[key]}")
    _check(opt.eps > 0, f"opt.eps must be positive, got {opt.eps}")
    _check(opt.weight_decay >= 0, f"opt.weight_decay must be >= 0, got {opt.weight_decay}")
    _check(opt.clip_norm >= 0, f"opt.clip_norm must be >= 0 (0 = off), got {opt.clip_norm}")
    _check(family.prompting is not None or not cfg.eval.sample_prompt,
           f"eval.sample_prompt is for the families that generate text "
           f"({', '.join(f.name for f in families.FAMILIES.values() if f.prompting)}); a "
           f"{model.family!r} model prints no text sample, so set --config.eval.sample_prompt=''")
    _check(cfg.eval.sample_tokens >= 1, f"eval.sample_tokens must be >= 1, got "
           f"{cfg.eval.sample_tokens}")
    _check(cfg.eval.sample_temperature >= 0, "eval.sample_temperature must be >= 0 (0 = greedy)"
           f", got {cfg.eval.sample_temperature}")
    _check(train.steps > 0, f"train.steps must be positive, got {train.steps}")
    _check(train.seed >= 0, f"train.seed must be >= 0, got {train.seed}")
    _check(train.z_loss >= 0, f"train.z_loss must be >= 0, got {train.z_loss}")
    _check(train.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0 = the device's known "
           f"peak), got {train.peak_tflops}")
    _check(train.log_every > 0, f"train.log_every must be positive, got {train.log_every}")
    _check(cfg.eval.every >= 0, f"eval.every must be >= 0 (0 = only at the end), got "
           f"{cfg.eval.every}")
    _check(cfg.eval.steps > 0, f"eval.steps must be positive, got {cfg.eval.steps}")
    _check(cfg.ckpt.every >= 0, f"ckpt.every must be >= 0, got {cfg.ckpt.every}")
    _check(cfg.ckpt.keep >= 1, f"ckpt.keep must be >= 1, got {cfg.ckpt.keep}")
    _check(cfg.ckpt.keep_best >= 0, f"ckpt.keep_best must be >= 0, got {cfg.ckpt.keep_best}")
    _check_mesh(cfg, devices)


def _check_lengths(cfg: ConfigDict, model: ModelConfig) -> None:
    """Every sequence the run feeds the model fits its positions (RoPE has no table)."""
    data, objective = cfg.data, cfg.train.objective
    if model.pos == "rope":
        return
    _check(data.seq_len <= model.max_len,
           f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}, the longest "
           f"sequence {model.pos} positions support")
    target = data_config.target_length(data, objective)
    if target:
        _check(target <= model.max_len,
               f"the decoder length {target} (data.target_len, 0 = derived from data.seq_len) "
               f"exceeds model.max_len={model.max_len}, the most {model.pos} positions encode; "
               "raise model.max_len or lower data.target_len")
    if cfg.eval.sample_prompt and families.family(model).prompting == "encode":
        _check(cfg.eval.sample_tokens <= model.max_len,
               f"eval.sample_tokens={cfg.eval.sample_tokens} exceeds model.max_len="
               f"{model.max_len}, the most tokens a {model.family} model with {model.pos} "
               "positions decodes; lower eval.sample_tokens or raise model.max_len")


def _check_mesh(cfg: ConfigDict, devices: Sequence[jax.Device] | None) -> None:
    """The mesh axes fit the devices, mesh.rules is a well-formed table, the micro-batch
    splits over the batch's mesh axes and the lengths over the sequence axis."""
    n_devices = len(jax.devices() if devices is None else devices)
    sizes = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, n_devices)))
    divisor = batch_divisor(sizes, rules_from_config(cfg.mesh.rules))
    micro = cfg.data.batch_size // cfg.opt.grad_accum
    _check(micro % divisor == 0,
           f"the micro-batch of {micro} rows (data.batch_size / opt.grad_accum) does not split "
           f"over the {divisor} devices of the batch's mesh axes (the 'batch' entry of "
           f"mesh.rules); use a multiple of {divisor}", MeshError)
    # sequence parallelism gives each device of the `sequence` axis an equal slice of the length
    lengths = {"data.seq_len": cfg.data.seq_len,
               "the decoder length (data.target_len, 0 = derived)":
                   data_config.target_length(cfg.data, cfg.train.objective)}
    for name, length in lengths.items():
        _check(not length or length % sizes["sequence"] == 0,
               f"{name}={length} does not split over mesh.sequence={sizes['sequence']} devices; "
               f"use a length that is a multiple of {sizes['sequence']}", MeshError)
