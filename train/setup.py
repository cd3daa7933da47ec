"""Everything a validated config determines before any array exists: the mesh, the model, the
optimizer, the shardings of the train state and the batch, and the jitted steps.

Training (train/loop.py), restoring a run (train/restore.py), Hugging Face import and the
benchmarks all start from `build`.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from data.tokenizer import Tokenizer, check_tokenizer
from errors import ConfigError
from model import quant as quant_lib
from model.config import ModelConfig
from model.sharding import (Rules, activate, batch_sharding, check_process_rows, make_mesh,
                            rules_from_config, wait_for_all_processes)
from train import (families, lora, optimizer, pruning, soft_prompt, state as state_lib,
                   step as step_lib, synthetic)


@dataclasses.dataclass
class Setup:
    """Everything a config determines before any array exists."""
    config: ConfigDict
    model_cfg: ModelConfig
    model: nn.Module
    mesh: Mesh
    rules: Rules
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    state_shardings: state_lib.TrainState
    batch_sharding: NamedSharding

    @property
    def objective(self) -> families.Objective:
        return families.objective(self.config.train.objective)

    def train_step(self, teacher: step_lib.Teacher | None = None):
        """The jitted `step(state, batch)`; with a distillation `teacher`, its loss and its
        params (bound here as the step's third argument)."""
        step = in_step(step_lib.jit_train_step(
            self.state_shardings, self.batch_sharding,
            None if teacher is None else teacher.shardings,
            objective=families.loss(self.config) if teacher is None else teacher.loss,
            model=self.model, tx=self.tx, lr_schedule=self.lr_schedule,
            grad_accum=self.config.opt.grad_accum, z_loss=self.config.train.z_loss,
            skip_nonfinite=self.config.train.get("nonfinite") == "skip"), "train")
        if teacher is None:
            return step
        return lambda state, batch: step(state, batch, teacher.params)

    def eval_step(self):
        return in_step(step_lib.jit_eval_step(
            self.state_shardings.params, self.batch_sharding, objective=families.loss(self.config),
            model=self.model), "eval")



_compiled_steps = itertools.count()   # the same sequence on every process: barrier names


def in_step(jitted, name: str):
    """`jitted` as it is with one process. With several, its first call compiles it ahead of
    time and waits until every process has, so all enter its collectives together: on CPU
    (gloo) a process that reaches a step's first collective 30 s after another (compile times
    differ on a loaded host) kills the run. `.lower` stays available."""
    if jax.process_count() == 1:
        return jitted
    compiled = []

    def call(*args):
        if not compiled:
            compiled.append(jitted.lower(*args).compile())
            wait_for_all_processes(f"loom: {name} step {next(_compiled_steps)} compiled")
        return compiled[0](*args)

    call.lower = jitted.lower
    return call


def build(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Setup:
    """Mesh (over `devices`, default all), model, optimizer and shardings for a config that
    `train.config.validate` accepted and whose vocab size is known (`with_vocab`)."""
    mesh = make_mesh(config.mesh, devices)
    rules = rules_from_config(config.mesh.rules)
    if jax.process_count() > 1:
        check_process_rows(mesh, rules)
    model_cfg = model_config(config)
    model = module(config, model_cfg)
    tx, lr_schedule = optimizer.make(config.opt, config.train.steps, config.finetune)
    tx = pruning.wrap(tx, config.prune)   # prune.target > 0: masks in the optimizer state
    with activate(mesh, rules):
        shardings = state_lib.shardings(model, model_cfg, tx, mesh, rules)
    return Setup(config, model_cfg, model, mesh, rules, tx, lr_schedule, shardings,
                 batch_sharding(mesh, rules))


def model_config(config: ConfigDict) -> ModelConfig:
    """The ModelConfig of a run's config (a quantized run's activations included)."""
    quant = config.get("quant", {})    # absent in checkpoints saved before quantization
    return ModelConfig.from_mapping(
        config.model,
        quant_activations=quant.get("activations", "") if quant.get("mode") == "ptq" else "")


def module(config: ConfigDict, model_cfg: ModelConfig) -> nn.Module:
    """The module `config` trains: its family's, under a task head, with a soft prompt, LoRA
    or quantization as the config says."""
    # labels are resolved from the train split when a run starts (train/finetune/backbone.py);
    # unresolved (benchmarks, shape checks) the head fits the synthetic batches' labels
    n_labels = len(config.data.task.labels) or synthetic.N_SYNTHETIC_LABELS
    ft = config.finetune
    model = families.build_for(model_cfg, config.train.objective, n_labels, ft.head_dropout,
                               ft.prompt_length if ft.mode == "prompt" else 0)
    if ft.mode == "prompt" and families.objective(config.train.objective).head is None:
        model = soft_prompt.SoftPromptModel(model, ft.prompt_length, model_cfg.init_std)
    if ft.mode == "lora":
        model = lora.LoraModel(model, ft.lora_rank, ft.lora_alpha, tuple(ft.lora_targets),
                               ft.lora_dropout)
    quant = config.get("quant", {})
    return quant_lib.wrap(model, quant.get("mode", "none"), quant.get("weights", "int8"),
                          quant.get("activations", ""), quant.get("calibration_batches", 0) > 0)


def with_vocab(config: ConfigDict, tokenizer: Tokenizer) -> ConfigDict:
    """The config with model.vocab_size resolved from the tokenizer (0 = take its size) and the
    tokenizer's fingerprint recorded (a configured one must match)."""
    config = ConfigDict(config.to_dict())
    check_tokenizer(tokenizer, config.data.tokenizer.fingerprint, "data.tokenizer.fingerprint")
    config.data.tokenizer.fingerprint = tokenizer.fingerprint
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} pieces; set it to 0 (automatic)")
    return config
