"""Orbax checkpoints of a run: params, optimizer state, step + RNG, data iterator, config.

Each is a separate item, so evaluation restores params alone (onto any mesh), while training
restores everything. Retention keeps the `ckpt.keep` latest checkpoints plus the `ckpt.keep_best`
with the lowest eval loss.
"""
from __future__ import annotations

import json
import os
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
             data_iterator: Any = None, eval_loss: float | None = None) -> None:
        items = dict(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            config=ocp.args.JsonSave(json.loads(json.dumps(dict(config), default=list))),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        metrics = None if eval_loss is None else {EVAL_METRIC: float(eval_loss)}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def _restore(self, step: int, **items) -> Any:
        where = self.path / str(step)
        missing = [name for name in items if not (where / name).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {where} has no {', '.join(missing)} item (it is "
                                  "incomplete); restore another step, e.g. --step latest or a "
                                  f"number from {self.steps()}")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            # orbax names the leaf whose shape, dtype or tree structure differs
            raise CheckpointError(
                f"checkpoint {where} does not fit this run: {_first_line(e)}; its parameters "
                "were saved for another model config (compare its config item with this "
                "run's)") from e
        except (OSError, RuntimeError) as e:   # tensorstore: unreadable or truncated files
            raise CheckpointError(f"checkpoint {where} cannot be read: {_first_line(e)}; it may "
                                  "be truncated or corrupt; restore another step") from e

    def restore_state(self, step: int, abstract_state: TrainState,
                      data_iterator: Any = None) -> TrainState:
        """The full train state at `step`, laid out like `abstract_state` (any mesh); the data
        iterator, if given, is set to where it was (a checkpoint without one, such as an
        imported model's, leaves it at the start)."""
        items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                     opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                     progress=ocp.args.StandardRestore({"step": abstract_state.step,
                                                        "rng": abstract_state.rng}))
        if data_iterator is not None and (self.path / str(step) / "data").exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self._restore(step, **items)
        return TrainState(step=out["progress"]["step"], params=out["params"],
                          opt_state=out["opt_state"], rng=out["progress"]["rng"])

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        return self._restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._restore(step, config=ocp.args.JsonRestore())["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

