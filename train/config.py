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
from train import families, pruning
from train.objectives import Split

SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("halt", "skip")


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
    trained = (f"model.family of {objective.carriers}" if objective.carriers else
               f"model.family={objective.family!r} model")
    _check(families.trains(train.objective, model.family),
           f"train.objective={train.objective!r} trains a {trained}, not "
           f"model.family={model.family!r}; set --config.model.family="
           f"{(objective.carriers or (objective.family,))[0]}, or an "
           f"objective for {model.family!r} models: "
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
    for key in ("pair_weight", "discriminator_weight"):   # loss weights (lambda) of mlm, electra
        _check(train[key] >= 0, f"train.{key} must be >= 0 (0 = that loss off), got "
               f"{train[key]}")
    _check(train.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0 = the device's known "
           f"peak), got {train.peak_tflops}")
    # .get: a checkpoint saved before these keys existed still restores
    nonfinite, grace = train.get("nonfinite", "halt"), train.get("preempt_grace_s", 30.0)
    _check(nonfinite in NONFINITE, f"train.nonfinite={nonfinite!r}: choose one of {NONFINITE}")
    _check(grace > 0, f"train.preempt_grace_s must be positive, got {grace}")
    _check(train.log_every > 0, f"train.log_every must be positive, got {train.log_every}")
    _check(cfg.eval.every >= 0, f"eval.every must be >= 0 (0 = only at the end), got "
           f"{cfg.eval.every}")
    _check(cfg.eval.steps > 0, f"eval.steps must be positive, got {cfg.eval.steps}")
    _check(cfg.ckpt.every >= 0, f"ckpt.every must be >= 0, got {cfg.ckpt.every}")
    _check(cfg.ckpt.keep >= 1, f"ckpt.keep must be >= 1, got {cfg.ckpt.keep}")
    _check(cfg.ckpt.keep_best >= 0, f"ckpt.keep_best must be >= 0, got {cfg.ckpt.keep_best}")
    _check_finetune(cfg)
    pruning.check(cfg.prune, model)
    _check_quant(cfg)
    _check_distill(cfg)
    _check_mesh(cfg, devices)


QUANT_MODES, QUANT_WEIGHTS, QUANT_ACTIVATIONS = ("none", "qat", "ptq"), ("int8", "int4"), ("", "int8")


def _check_quant(cfg: ConfigDict) -> None:
    """The quant.* keys (model/quant.py reads them). .get: older checkpoints have none."""
    quant = cfg.get("quant", {})
    mode, weights = quant.get("mode", "none"), quant.get("weights", "int8")
    activations = quant.get("activations", "")
    _check(mode in QUANT_MODES, f"quant.mode={mode!r}: choose one of {QUANT_MODES} (ptq runs "
           "are made by python -m train.compress quantize)")
    _check(weights in QUANT_WEIGHTS, f"quant.weights={weights!r}: choose one of {QUANT_WEIGHTS}")
    _check(activations in QUANT_ACTIVATIONS, f"quant.activations={activations!r}: choose one of "
           f"{QUANT_ACTIVATIONS} ('' = weights only)")
    calibrated = quant.get("calibration_batches", 0)
    _check(calibrated >= 0, f"quant.calibration_batches must be >= 0, got {calibrated}")
    _check(not calibrated or activations, "quant.calibration_batches calibrates static scales "
           "of int8 activations; set quant.activations=int8 (or leave it 0)")
    _check(not calibrated or mode == "ptq", "quant.calibration_batches is for post-training "
           "quantization (train.compress quantize --calibration-batches N), not quant.mode="
           f"{mode}")
    _check(mode != "qat" or cfg.finetune.mode != "lora", "quant.mode=qat with finetune.mode=lora "
           "is not supported (the adapters are a separate float branch); use finetune.mode=full")


FINETUNE_MODES = ("full", "frozen", "lora", "prompt")
TASK_METRICS = {"classify": ("loss", "accuracy", "macro_f1"),
                "tag": ("loss", "accuracy", "f1", "precision", "recall"),
                "text2text": ("loss", "exact_match", "bleu", "chrf", "rougeL")}


def _check_finetune(cfg: ConfigDict) -> None:
    """The finetune.* keys (train/finetune/ reads them)."""
    ft, objective = cfg.finetune, cfg.train.objective
    _check(ft.mode in FINETUNE_MODES, f"finetune.mode={ft.mode!r}: choose one of "
           f"{FINETUNE_MODES}")
    for key in ("unfreeze_after", "unfreeze_every", "patience", "eval_examples"):
        _check(ft[key] >= 0, f"finetune.{key} must be >= 0 (0 = off), got {ft[key]}")
    _check(ft.prompt_length >= 1, f"finetune.prompt_length must be >= 1, got "
           f"{ft.prompt_length}")
    _check(ft.mode != "prompt" or families.objective(objective).head is not None
           or objective == "text2text",
           f"finetune.mode=prompt tunes a soft prompt for a task (classify, tag, text2text), "
           f"not train.objective={objective}")
    _check(ft.lora_rank >= 1, f"finetune.lora_rank must be >= 1, got {ft.lora_rank}")
    _check(ft.lora_alpha > 0, f"finetune.lora_alpha must be positive, got {ft.lora_alpha}")
    _check(0 <= ft.lora_dropout < 1, f"finetune.lora_dropout must be in [0, 1), got "
           f"{ft.lora_dropout}")
    _check(bool(ft.lora_targets) and all(isinstance(t, str) and t for t in ft.lora_targets),
           f"finetune.lora_targets={tuple(ft.lora_targets)!r}: name projections, e.g. "
           "query,value")
    _check(ft.max_new_tokens >= 1, f"finetune.max_new_tokens must be >= 1, got "
           f"{ft.max_new_tokens}")
    _check(0 < ft.layer_lr_decay <= 1, f"finetune.layer_lr_decay must be in (0, 1] (1 = off), "
           f"got {ft.layer_lr_decay}")
    _check(0 <= ft.head_dropout < 1, f"finetune.head_dropout must be in [0, 1), got "
           f"{ft.head_dropout}")
    _check(not (ft.unfreeze_after and ft.unfreeze_every),
           "finetune.unfreeze_after and finetune.unfreeze_every are two unfreezing schedules; "
           "set one of them to 0")
    _check(ft.mode == "full" or not (ft.unfreeze_after or ft.unfreeze_every),
           "finetune.unfreeze_after/unfreeze_every start frozen and unfreeze by themselves; "
           "leave finetune.mode=full")
    # ALBERT (model.share_layers): one block is every layer, so it has no depth of its own
    _check(not cfg.model.share_layers or (ft.layer_lr_decay == 1 and not ft.unfreeze_every),
           f"finetune.layer_lr_decay={ft.layer_lr_decay} / finetune.unfreeze_every="
           f"{ft.unfreeze_every} work block by block, but model.share_layers=True has one block "
           "for all layers; set layer_lr_decay=1 and unfreeze_every=0")
    allowed = TASK_METRICS.get(objective, ("loss",))
    _check(not ft.metric or ft.metric in allowed,
           f"finetune.metric={ft.metric!r} is not a metric of train.objective={objective}; "
           f"choose one of {allowed}")
    _check(not ft.patience or bool(cfg.eval.every),
           "finetune.patience counts evaluations: set eval.every > 0")
    needs_head = families.objective(objective).head is not None
    _check(needs_head or (ft.mode != "frozen" and not ft.unfreeze_after and not ft.unfreeze_every),
           f"finetune.mode={ft.mode!r}, finetune.unfreeze_after={ft.unfreeze_after}, "
           f"finetune.unfreeze_every={ft.unfreeze_every}: freezing trains a head on a frozen "
           f"backbone, but train.objective={objective} has no head (the whole model writes "
           "the text); use finetune.mode=full, unfreezing 0 (layer_lr_decay still applies)")


def _check_distill(cfg: ConfigDict) -> None:
    """The distill.* keys (train/distill/ reads them)."""
    kd = cfg.distill
    _check(0 <= kd.alpha <= 1, f"distill.alpha must be in [0, 1] (the soft loss's share), got "
           f"{kd.alpha}")
    _check(kd.temperature > 0, f"distill.temperature must be positive, got {kd.temperature}")
    if not kd.teacher:
        return
    objective = cfg.train.objective
    distillable = [o for o in (*families.OBJECTIVES, *families.TASKS)
                   if isinstance(families.objective(o).loss, Split)]
    _check(isinstance(families.objective(objective).loss, Split),
           f"distill.teacher is set, but train.objective={objective} has no single predicted "
           f"distribution to distil; distillation works for {', '.join(distillable)}")


def _check_lengths(cfg: ConfigDict, model: ModelConfig) -> None:
    """Every sequence the run feeds the model fits its positions (RoPE and T5's relative
    buckets have no table)."""
    data, objective = cfg.data, cfg.train.objective
    if model.unbounded_positions:
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
