"""Orbax checkpoints of a run: params, optimizer state, step + RNG, data iterator, config.

Each is a separate item, so evaluation restores params alone (onto any mesh), while training
restores everything. Retention keeps the `ckpt.keep` latest checkpoints plus the `ckpt.keep_best`
with the lowest eval loss.

A checkpoint that cannot be read (a truncated, deleted or garbled file, a missing item) raises
`UnreadableCheckpoint`, apart from one that reads but does not fit the model (`CheckpointError`):
training then moves it aside (`quarantine`, never deleting it) and resumes from the one before.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from configs.base import get_config as base_config
from errors import CheckpointError
from train.state import TrainState

EVAL_METRIC = "eval_loss"


def directory(workdir: str | os.PathLike) -> Path:
    return Path(workdir).expanduser().absolute() / "checkpoints"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated or corrupt (not one of another model)."""


# orbax's words for a checkpoint of another shape or tree (the files themselves read fine)
_MISFIT = re.compile(r"Structure mismatch|stored shape|tree structure|does not match|dtype")
# tensorstore's status codes and the file-level failures of a damaged checkpoint
_DAMAGE = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT"
                     r"|UNKNOWN|INTERNAL):|Error (reading|opening)|Truncated|corrupt|Expecting "
                     r"value|Unterminated|No such file")

_OS_ERROR = re.compile(r"File too large|No space left on device|Disk quota exceeded|Permission "
                       r"denied|Read-only file system|Not a directory|Is a directory|"
                       r"Input/output error")


def _closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_tracebacks() -> None:
    """From now on (once per process), the "Event loop is closed" tracebacks that tensorstore's
    callbacks raise on orbax's closed event loop when a save fails (dozens, from its writer
    threads, printed through sys.excepthook or as unraisable, interleaved with Loom's error) are
    not printed: the failed save is reported once, as the run's one-line error."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    if getattr(excepthook, "drops_closed_loop", False):
        return

    def quiet_excepthook(kind, value, tb):
        if not _closed_loop(value):
            excepthook(kind, value, tb)

    def quiet_unraisablehook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            unraisablehook(unraisable)

    quiet_excepthook.drops_closed_loop = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _innermost(e: BaseException) -> BaseException:
    """The exception in `e`'s chain that says what went wrong (tensorstore wraps its status in
    an `Exception` whose message is a 150-line spec dump)."""
    chain = _chain(e)
    return next((c for c in reversed(chain) if _DAMAGE.search(str(c))), chain[-1])


class _RaisedAnyway(logging.Filter):
    """Drops orbax's traceback of a failed writer thread: the same error reaches `save` or
    `wait`, which raise it as one CheckpointError (its traceback under --verbose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


_ORBAX_THREADS = _RaisedAnyway()


class _AbandonedWrites(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" of orbax's write tasks that a
    failed save abandons: each repeats the save's own error (one CheckpointError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved")
                    and "orbax" in message)


_ORBAX_TASKS = _AbandonedWrites()


class Checkpointer:
    """One run's checkpoint directory (`<workdir>/checkpoints/<step>/<item>`)."""

    def __init__(self, workdir: str | os.PathLike, ckpt_cfg: Mapping[str, Any] | None = None,
                 *, read_only: bool = False):
        ckpt_cfg = base_config().ckpt.to_dict() | dict(ckpt_cfg or {})   # defaults: base.py
        keep = [policies.LatestN(n=ckpt_cfg["keep"])]
        if ckpt_cfg["keep_best"]:
            keep.append(policies.BestN(get_metric_fn=lambda m: m[EVAL_METRIC], reverse=True,
                                       n=ckpt_cfg["keep_best"],
                                       keep_checkpoints_without_metrics=False))
        self.path = directory(workdir)
        logging.getLogger("absl").addFilter(_ORBAX_THREADS)   # once: filters are a set
        logging.getLogger("asyncio").addFilter(_ORBAX_TASKS)
        _drop_closed_loop_tracebacks()
        if read_only and not self.path.is_dir():
            raise CheckpointError(f"no checkpoints in {self.path}; is --workdir the directory of "
                                  "a training run?")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            # best_fn also makes orbax write the metrics next to each checkpoint, so a restarted
            # run (and `--step best`) still knows which one was best
            best_fn=lambda m: m[EVAL_METRIC], best_mode="min",
            keep_checkpoints_without_metrics=True,
            enable_async_checkpointing=ckpt_cfg["async_save"] and not read_only,
            read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.path, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def quarantine(self, step: int) -> Path:
        """Moves the unreadable checkpoint `step` out of the run (to `checkpoints.corrupt/`),
        so retention and later saves of that step number ignore it; returns where it went."""
        aside = self.path.parent / "checkpoints.corrupt"
        aside.mkdir(exist_ok=True)
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        (self.path / str(step)).rename(target)
        self.manager.reload()
        return target

    def unquarantine(self, moved: Path, step: int) -> None:
        """Puts a checkpoint `quarantine` moved back (when no checkpoint of the run reads)."""
        moved.rename(self.path / str(step))
        self.manager.reload()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the lowest eval loss (None if no checkpoint has one)."""
        scored = [(m[EVAL_METRIC], s) for s in self.steps()
                  if (m := self.manager.metrics(s)) and EVAL_METRIC in m]
        return min(scored)[1] if scored else None

    def resolve(self, which: str | int) -> int:
        """'latest', 'best' or a step number -> an existing step, or a clear error."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.path}")
        if which == "latest":
            return steps[-1]
        if which == "best":
            best = self.best_step()
            if best is None:
                raise CheckpointError(f"no checkpoint in {self.path} has an eval loss; "
                                      "use --step latest or a step number")
            return best
        try:
            step = int(which)
        except ValueError:
            raise CheckpointError(f"--step {which!r}: use latest, best or a number") from None
        if step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.path}; kept: {steps}")
        return step

    def save(self, step: int, state: TrainState, *, config: Mapping[str, Any],
             data_iterator: Any = None, eval_loss: float | None = None,
             loop: Mapping[str, Any] | None = None) -> None:
        """`loop`: the loop's own small state that must survive a resume (early stopping's)."""
        items = dict(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            config=ocp.args.JsonSave(json.loads(json.dumps(dict(config), default=list))),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if loop:
            items["loop"] = ocp.args.JsonSave(dict(loop))
        metrics = None if eval_loss is None else {EVAL_METRIC: float(eval_loss)}
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=True)
        except Exception as e:   # disk full, a path in the way, permissions, ...
            self._drain_quietly()
            raise self._save_failed(step, e) from e

    def _drain_quietly(self) -> None:
        """After a failed save: stops orbax's writer threads, and the tracebacks each would log
        of the same error (which the error raised keeps as its cause), for the rest of the
        process, which is ending with that error."""
        for name in ("absl", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _drop_closed_loop_tracebacks()
        try:
            self.manager.close()
        except Exception:   # noqa: BLE001 - the save's own error is the one reported
            pass

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointError:
        committed = sorted(int(p.name) for p in self.path.iterdir() if p.name.isdigit()
                           and int(p.name) != step) if self.path.is_dir() else []
        kept = (f"the previous checkpoint (step {committed[-1]}) is kept" if committed
                else "there is no earlier checkpoint")
        which = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
        os_error = next((m.group(0) for c in _chain(e) if (m := _OS_ERROR.search(str(c)))), None)
        return CheckpointError(f"writing {which} to {self.path} failed "
                               f"({os_error or _first_line(_innermost(e))}); {kept}. Free disk "
                               "space or fix the directory, then run the same command to resume")

    def _restore(self, step: int, **items) -> Any:
        where = self.path / str(step)
        others = [s for s in self.steps() if s != step]
        missing = [name for name in items if not (where / name).exists()]
        if missing:
            raise UnreadableCheckpoint(
                f"checkpoint {where} has no {', '.join(missing)} item: it is incomplete (a "
                f"half-written or damaged directory); use another step ({others or 'none'})")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            cause = _innermost(e)
            if _MISFIT.search(str(cause)) and not _DAMAGE.search(str(cause)):
                # orbax names the leaf whose shape, dtype or tree structure differs
                raise CheckpointError(
                    f"checkpoint {where} does not fit this run: {_first_line(cause)}; its "
                    "parameters were saved for another model config (compare its config item "
                    "with this run's)") from e
            raise UnreadableCheckpoint(
                f"checkpoint {where} cannot be read ({_first_line(cause)}): it is truncated or "
                f"corrupt; use another step ({others or 'none'})") from e

    def restore_state(self, step: int, abstract_state: TrainState,
                      data_iterator: Any = None) -> TrainState:
        """The full train state at `step`, laid out like `abstract_state` (any mesh); the data
        iterator, if given, is set to where it was (a checkpoint without one, such as an
        imported model's, leaves it at the start)."""
        items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                     opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                     progress=ocp.args.StandardRestore({"step": abstract_state.step,
                                                        "rng": abstract_state.rng}))
        # every checkpoint the loop writes holds the data iterator; only step 0 of an imported
        # model has none (and the stream starts at the beginning then anyway)
        if data_iterator is not None and (step > 0 or (self.path / str(step) / "data").exists()):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self._restore(step, **items)
        return TrainState(step=out["progress"]["step"], params=out["params"],
                          opt_state=out["opt_state"], rng=out["progress"]["rng"])

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        return self._restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._restore(step, config=ocp.args.JsonRestore())["config"]

    def restore_loop(self, step: int) -> dict[str, Any]:
        """The loop state saved with `step` ({} for a checkpoint saved without one)."""
        if not (self.path / str(step) / "loop").exists():
            return {}
        return self._restore(step, loop=ocp.args.JsonRestore())["loop"]

    def wait(self) -> None:
        """Blocks until a background save is committed; its failure is a CheckpointError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._drain_quietly()
            raise self._save_failed(None, e) from e

    def close(self) -> None:
        self.manager.close()

