"""Resuming a run: which checkpoint to continue from, and whether this config may continue it.

The latest checkpoint that reads is used; one that does not (truncated, deleted or garbled
files, a missing item) is named, moved to `checkpoints.corrupt/` and the one before it tried,
so nothing is deleted and no step of a damaged checkpoint is trained over silently.

A config that changes what the checkpoint's numbers mean (the model, the vocabulary, the
objective, the sequence length or the global batch, which the data stream's position counts
in) is refused; any other change (lr, steps, eval or checkpoint cadence, ...) is accepted and
returned, for the loop to record in metrics.jsonl.
"""
from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import jax
from ml_collections import ConfigDict

from configs.loader import flat_items
from errors import CheckpointError
from train.checkpoint import Checkpointer, UnreadableCheckpoint
from train.metrics import console

# keys a resumed run must keep: a prefix ending in "." covers a whole section
FIXED = ("model.", "train.objective", "data.seq_len", "data.target_len", "data.batch_size",
         "data.tokenizer.fingerprint", "finetune.init_from", "finetune.mode",
         "finetune.prompt_length", "finetune.lora_rank", "finetune.lora_targets",
         "data.task.labels", "distill.teacher_checkpoint")
WHY = {"model.": "the parameters define the model",
       "data.tokenizer.fingerprint": "the embeddings belong to the vocabulary",
       "train.objective": "the optimizer state was built for its loss",
       "data.seq_len": "the data stream's position counts rows of that length",
       "data.target_len": "the data stream's position counts rows of that length",
       "data.batch_size": "the data stream's position counts global batches of that size",
       "finetune.init_from": "the run's weights started from that backbone",
       "finetune.mode": "the trainable parameters and their optimizer state follow the mode",
       "finetune.prompt_length": "the parameters define the model",
       "finetune.lora_rank": "the parameters define the model",
       "finetune.lora_targets": "the parameters define the model",
       "data.task.labels": "the head's outputs are those labels",
       "distill.teacher_checkpoint": "the student is being distilled from that teacher "
                                     "checkpoint"}

T = TypeVar("T")


def _flat(config: Any) -> dict[str, Any]:
    plain = json.loads(json.dumps(config.to_dict() if isinstance(config, ConfigDict) else config,
                                  default=list))
    return dict(flat_items(ConfigDict(plain)))


def config_changes(saved: dict[str, Any], config: ConfigDict, where: str
                   ) -> dict[str, list[Any]]:
    """{key: [saved, now]} for the safe changes; a fixed key that changed is a CheckpointError
    naming it (every one, in one line)."""
    before, now = _flat(saved), _flat(config)
    changed = {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)}
    if not before.get("data.tokenizer.fingerprint"):   # not recorded (an older import)
        changed.pop("data.tokenizer.fingerprint", None)
    # a key the saved config lacks is one a newer Loom added (its default keeps the old
    # behaviour): recorded as a change, never a reason to refuse the run
    fixed = {k: v for k, v in changed.items() if k in before
             and any(k == f or (f.endswith(".") and k.startswith(f)) for f in FIXED)}
    if fixed:
        if "data.tokenizer.fingerprint" in fixed:
            a, b = fixed["data.tokenizer.fingerprint"]
            raise CheckpointError(f"{where} was trained with tokenizer {a}, but this run's is "
                                  f"{b}; restore the run's original tokenizer.model, or use a "
                                  "new --workdir")
        reasons = sorted({WHY[next(f for f in FIXED if k == f or (f.endswith(".")
                                                                   and k.startswith(f)))]
                          for k in fixed})
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fixed.items())
        raise CheckpointError(f"{where} was trained with different settings that cannot change "
                              f"on resume ({listed}; {'; '.join(reasons)}); restore them, or use "
                              "a new --workdir")
    return changed


def latest_readable(ckpt: Checkpointer, restore: Callable[[int], T]) -> T | None:
    """`restore(step)` of the latest checkpoint that reads (None: the run has none).

    Unreadable ones are moved aside on the way; if none reads, they are put back and the error
    names them all, since then the cause is likelier this installation than the files.
    """
    moved = []
    for step in reversed(ckpt.steps()):
        try:
            return restore(step)
        except UnreadableCheckpoint as e:
            target = _quarantine(ckpt, step)
            console(f"warning: {e}; moved it to {target} and trying the checkpoint before it")
            moved.append((target, step, str(e)))
    if not moved:
        return None
    for target, step, _ in reversed(moved):
        _unquarantine(ckpt, target, step)
    raise CheckpointError(f"no checkpoint in {ckpt.path} can be read (steps "
                          f"{sorted(s for _, s, _ in moved)}; the latest: {moved[0][2]}); use a "
                          "new --workdir to start over")


def _quarantine(ckpt: Checkpointer, step: int):
    target = ckpt.quarantine(step) if jax.process_index() == 0 else None
    return _synced(ckpt, target, f"loom: quarantined checkpoint {step}")


def _unquarantine(ckpt: Checkpointer, target, step: int) -> None:
    if jax.process_index() == 0:
        ckpt.unquarantine(target, step)
    _synced(ckpt, None, f"loom: restored checkpoint {step}")


def _synced(ckpt: Checkpointer, value, name: str):
    """Every process sees process 0's move of a checkpoint directory before going on."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils   # deferred: multi-process runs only
        multihost_utils.sync_global_devices(name)
        ckpt.manager.reload()
    return value or "checkpoints.corrupt/"
