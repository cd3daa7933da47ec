"""`distill.teacher`: the frozen run a student is distilled from.

`resolve` (before the student's run directory is touched) pins the teacher's checkpoint as
distill.teacher_checkpoint (which a resumed run must find unchanged, train/resume.py) and gives
the student what the soft loss compares over: the teacher's vocabulary (another tokenizer is an
error), its vocabulary size and, for a task, its label set. `restore` rebuilds the teacher from
its own saved config (family, shape, head) and restores its params onto the student's mesh by
the same logical rules: no optimizer state, not in the student's checkpoints, no gradient.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
from ml_collections import ConfigDict

from data import config as data_config, pipeline, tasks as tasks_lib
from data.tokenizer import MODEL_FILE, Tokenizer
from errors import CheckpointError, ConfigError
from model.config import ModelConfig
from model.sharding import activate, logical_shardings, unboxed
from train import families, lora, state as state_lib
from train.checkpoint import Checkpointer
from train.config import validate
from train.distill.loss import distilled
from train.metrics import console
from train.restore import saved_config
from train.setup import Setup, model_config, module
from train.step import Teacher


def split_spec(spec: str) -> tuple[Path, str]:
    """'DIR', 'DIR@best' or 'DIR@STEP' -> (DIR, step)."""
    where, _, step = spec.partition("@")
    return Path(where).expanduser(), step or "latest"


def resolve(config: ConfigDict) -> ConfigDict:
    """The config with the teacher pinned and its vocabulary (and labels) taken; validated.
    Without distill.teacher, the config as it is. Reads the teacher's run, writes nothing."""
    if not config.distill.teacher:
        return config
    config = ConfigDict(config.to_dict())
    spec, objective = config.distill.teacher, config.train.objective
    run, step = split_spec(spec)
    if not (run / "checkpoints").is_dir():
        raise CheckpointError(f"distill.teacher={spec}: {run} is not a Loom run directory (no "
                              "checkpoints/); point it at the teacher's training --workdir")
    try:
        saved, resolved = saved_config(run, step)
    except CheckpointError as e:
        raise CheckpointError(f"distill.teacher={spec}: {e}") from e
    if saved.train.objective != objective:
        raise ConfigError(f"distill.teacher={spec} was trained with train.objective="
                          f"{saved.train.objective}, this run with {objective}; a teacher "
                          "predicts what its student learns: distil from a run of the same "
                          "objective")
    _use_vocabulary(config, spec, run / MODEL_FILE, saved)
    if config.model.vocab_size not in (0, saved.model.vocab_size):
        raise ConfigError(f"model.vocab_size={config.model.vocab_size}, but the teacher "
                          f"{spec} predicts over {saved.model.vocab_size} pieces; set it to 0 "
                          "(the teacher's)")
    config.model.vocab_size = saved.model.vocab_size
    if families.objective(objective).head:
        _use_labels(config, spec, tuple(saved.data.task.labels))
    _check_lengths(config, spec, saved)
    config.distill.teacher_checkpoint = f"{run.resolve()}@{resolved}"
    validate(config)
    return config


def _use_vocabulary(config: ConfigDict, spec: str, path: Path, saved: ConfigDict) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a run directory keeps its vocabulary there")
    teacher = saved.data.tokenizer.get("fingerprint", "") or Tokenizer.load(path).fingerprint
    configured = config.data.tokenizer.path
    if configured:
        own = Tokenizer.load(configured).fingerprint
        if own != teacher:
            raise ConfigError(f"distill.teacher={spec} has another vocabulary (fingerprint "
                              f"{teacher}) than data.tokenizer.path={configured} ({own}); a "
                              "student learns its teacher's distribution over the same pieces: "
                              "leave data.tokenizer.path empty (the teacher's is used), or "
                              "distil from a teacher trained with this tokenizer")
    config.data.tokenizer.path = configured or str(path)
    config.data.tokenizer.fingerprint = teacher


def _use_labels(config: ConfigDict, spec: str, labels: tuple[str, ...]) -> None:
    """The teacher's head predicts `labels`; the student's must be the same, in the same order,
    and its train split may use no other."""
    task, own = config.train.objective, tuple(config.data.task.labels)
    if own and own != labels:
        raise ConfigError(f"data.task.labels={own} differ from the teacher's {labels} "
                          f"({spec}); leave data.task.labels empty (the teacher's are used)")
    found = tasks_lib.label_set(pipeline.task_records(config.data, config.data.train_split), task)
    extra = sorted(set(found) - set(labels))
    if extra:
        raise ConfigError(f"the train split has labels {extra} that the teacher {spec} never "
                          f"predicts (its labels: {', '.join(labels)}); distil on the "
                          "teacher's task")
    config.data.task.labels = labels


def _check_lengths(config: ConfigDict, spec: str, saved: ConfigDict) -> None:
    """The teacher reads the student's rows: they fit its positions."""
    if saved.model.pos == "rope":
        return
    lengths = (config.data.seq_len, data_config.target_length(config.data,
                                                              config.train.objective))
    if max(lengths) > saved.model.max_len:
        raise ConfigError(f"the rows of this run ({max(lengths)} tokens) are longer than the "
                          f"teacher {spec} reads (model.max_len={saved.model.max_len} "
                          f"{saved.model.pos} positions); lower data.seq_len")


def restore(setup: Setup) -> Teacher | None:
    """The teacher of `setup.config` on its mesh (None without distill.teacher)."""
    kd = setup.config.distill
    if not kd.teacher:
        return None
    run, step = split_spec(kd.teacher_checkpoint)
    saved, _ = saved_config(run, step)
    cfg = model_config(saved)
    teacher_model = module(saved, cfg)
    shapes, shardings = _layout(setup, teacher_model, cfg)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    params = Checkpointer(run, read_only=True).restore_params(int(step), abstract)
    if saved.finetune.mode == "lora":   # adapters merged: the plain model, as train.restore
        params = lora.merge(params, saved.finetune.lora_alpha / saved.finetune.lora_rank)
        saved.finetune.mode = "full"
        teacher_model = module(saved, cfg)
        _, shardings = _layout(setup, teacher_model, cfg)
        params = jax.device_put(params, shardings)
    _check_outputs(setup, saved, kd.teacher)
    console(f"distill: teacher {kd.teacher_checkpoint} ({cfg.family}, "
            f"{state_lib.param_count(params) / 1e6:.2f}M params, frozen), alpha={kd.alpha}, "
            f"T={kd.temperature}")
    loss = distilled(setup.objective.loss, teacher_model, kd.alpha, kd.temperature)
    weights = families.loss_weights(setup.config)    # the hard loss's lambdas (mlm: pair)
    return Teacher(loss=functools.partial(loss, **weights) if weights else loss,
                   params=params, shardings=shardings)


def _layout(setup: Setup, model, cfg: ModelConfig):
    """Param shapes of `model` and their shardings on the student's mesh and rules."""
    with activate(setup.mesh, setup.rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *families.init_inputs(
            cfg, model=model))["params"])
        return unboxed(boxed), logical_shardings(boxed, setup.mesh, setup.rules)


def _check_outputs(setup: Setup, saved: ConfigDict, spec: str) -> None:
    """Teacher and student predict over the same outputs, from rows of the same layout (what
    resolve could not see when finetune.init_from replaced the student's model)."""
    student = setup.config
    if families.objective(student.train.objective).head is None:
        ok = saved.model.vocab_size == setup.model_cfg.vocab_size
        what = f"{saved.model.vocab_size} vs {setup.model_cfg.vocab_size} vocabulary entries"
    else:
        ok = tuple(saved.data.task.labels) == tuple(student.data.task.labels) and \
            saved.data.task.layout == student.data.task.layout
        what = (f"labels {tuple(saved.data.task.labels)} in {saved.data.task.layout!r} rows vs "
                f"{tuple(student.data.task.labels)} in {student.data.task.layout!r} rows")
    if not ok:
        raise ConfigError(f"the teacher {spec} and this student predict different outputs "
                          f"({what}); distil from a teacher of the same vocabulary and task "
                          "layout")
