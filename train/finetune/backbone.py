"""`finetune.init_from`: the backbone a fine-tuning run starts from.

`resolve` fixes everything a fine-tuning config leaves to the backbone and the data before the
run is built: the model section (the backbone's, with only the SAFE keys taken from the config),
the vocabulary (the backbone's; another tokenizer is an error), data.task.layout (from the
family) and data.task.labels (the train split's sorted labels; the eval split may use no other).
`initial_state` restores the backbone's params onto the run's mesh under a fresh head, with a
fresh optimizer state; a resumed run restores its own checkpoint instead (train/loop.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from data import pipeline, tasks as tasks_lib
from data.tokenizer import MODEL_FILE, Tokenizer
from errors import CheckpointError, ConfigError
from model.sharding import activate, logical_shardings
from train import families, lora, soft_prompt, state as state_lib
from train.checkpoint import Checkpointer
from train.config import validate
from train.restore import saved_config
from train.setup import Setup

SAFE = ("dropout", "dtype", "remat")   # model keys a fine-tuning run may change
LABELS_FILE = "labels.json"
log = logging.getLogger(__name__)


def split_spec(spec: str) -> tuple[Path, str]:
    """'DIR', 'DIR@best' or 'DIR@STEP' -> (DIR, step)."""
    where, _, step = spec.partition("@")
    return Path(where).expanduser(), step or "latest"


def backbone_run(spec: str, workdir: Path) -> tuple[Path, str]:
    """The Loom run directory and step of `finetune.init_from`; a Hugging Face directory is
    imported once into `<workdir>/backbone` (train.export from-hf's import)."""
    where, step = split_spec(spec)
    if (where / "checkpoints").is_dir():
        return where, step
    if (where / "config.json").is_file() and not (where / "checkpoints").exists():
        imported = workdir / "backbone"
        if not (imported / "checkpoints").is_dir():
            from train.hf import convert   # deferred: loads transformers' safetensors readers
            convert.import_hf(where, imported)
        return imported, "latest"
    raise CheckpointError(f"finetune.init_from={spec}: {where} is not a Loom run directory (no "
                          "checkpoints/) nor a Hugging Face model directory (no config.json); "
                          "point it at a training run's --workdir")


def resolve(config: ConfigDict, workdir: str | Path) -> ConfigDict:
    """The config with the backbone's model and vocabulary and the task's layout and labels
    resolved (see the module docstring); validated."""
    validate(config)
    config = ConfigDict(config.to_dict())
    objective = families.objective(config.train.objective)
    if config.finetune.init_from:
        run, step = backbone_run(config.finetune.init_from, Path(workdir))
        saved, _ = saved_config(run, step)
        model = dict(saved.model.to_dict())
        changed = [k for k in model if k not in SAFE and config.model.get(k) != model[k]]
        model.update({k: config.model[k] for k in SAFE})
        if changed:
            log.info("finetune: model from %s (replacing %s)", run, ", ".join(changed))
        config.model = ConfigDict(model)
        _use_vocabulary(config, run / MODEL_FILE, saved.data.tokenizer.get("fingerprint", ""))
        if not families.trains(config.train.objective, config.model.family):
            raise ConfigError(f"finetune.init_from={config.finetune.init_from} is a "
                              f"{config.model.family!r} model, which cannot carry a "
                              f"{config.train.objective} task; use a backbone of "
                              f"{objective.carriers}")
        if families.family(config.model.family).prompting is None:
            config.eval.sample_prompt = ""
    if config.train.objective in tasks_lib.TASKS:
        if config.data.task.layout == "auto":
            config.data.task.layout = families.family(config.model.family).task_layout
        if objective.head and not config.data.task.labels:
            config.data.task.labels = tasks_lib.label_set(
                pipeline.task_records(config.data, config.data.train_split),
                config.train.objective)
        if objective.head:
            tasks_lib.check_labels(pipeline.task_records(config.data, config.data.eval_split),
                                   config.train.objective, config.data.task.labels,
                                   config.data.eval_split)
            Path(workdir).mkdir(parents=True, exist_ok=True)
            (Path(workdir) / LABELS_FILE).write_text(json.dumps(
                list(config.data.task.labels), indent=1) + "\n")
    validate(config)
    return config


def _use_vocabulary(config: ConfigDict, path: Path, fingerprint: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a run directory keeps its vocabulary there")
    backbone = Tokenizer.load(path)
    configured = config.data.tokenizer.path
    if configured and Tokenizer.load(configured).fingerprint != backbone.fingerprint:
        raise ConfigError(f"data.tokenizer.path={configured} is not the vocabulary of the "
                          f"backbone ({path}); a fine-tuned model keeps its backbone's "
                          "tokenizer: leave data.tokenizer.path empty")
    config.data.tokenizer.path = str(path)
    config.data.tokenizer.fingerprint = fingerprint or backbone.fingerprint


def initial_state(setup: Setup, workdir: Path) -> state_lib.TrainState:
    """Step 0 of a run: fresh params, or the backbone's params under a fresh head; a fresh
    optimizer state either way."""
    config = setup.config
    fresh = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings,
                           config.train.seed)
    if not config.finetune.get("init_from"):
        return fresh
    run, step = backbone_run(config.finetune.init_from, workdir)
    backbone = families.build(setup.model_cfg)
    with activate(setup.mesh, setup.rules):
        boxed = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), *families.init_inputs(
            setup.model_cfg))["params"])
        shardings = logical_shardings(boxed, setup.mesh, setup.rules)
    shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if hasattr(x, "unbox")
                          else x, boxed, is_leaf=lambda x: hasattr(x, "unbox"))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    ckpt = Checkpointer(run, read_only=True)
    restored = ckpt.restore_params(ckpt.resolve(step), abstract)
    params = dict(fresh.params)
    if "backbone" in params:    # a task head: graft what the TaskModel uses
        params["backbone"] = _graft(params["backbone"], restored, "backbone")
    else:   # the family's own LM (text2text); LoRA adapters and a soft prompt stay fresh
        params.update(_graft({k: v for k, v in params.items()
                              if k not in (lora.KEY, soft_prompt.KEY)}, restored, ""))
    return state_lib.from_params(params, setup.tx, setup.state_shardings, config.train.seed)


def _graft(fresh: Any, restored: Any, where: str) -> Any:
    """`fresh` with every leaf replaced by the backbone's at the same path."""
    if not isinstance(fresh, dict):
        if fresh.shape != restored.shape:
            raise CheckpointError(f"backbone parameter {where} has shape {restored.shape}, the "
                                  f"fine-tuned model's is {fresh.shape}")
        return restored
    missing = [k for k in fresh if k not in restored]
    if missing:
        raise CheckpointError(f"the backbone has no parameters {where}/{missing[0]}; was it "
                              "trained with another model config?")
    return {k: _graft(v, restored[k], f"{where}/{k}") for k, v in fresh.items()}
