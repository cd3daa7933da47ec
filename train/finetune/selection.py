"""Which checkpoint is best and when to stop: `finetune.metric` on the validation split.

During training each evaluation of a task run adds the task metrics (train/finetune/predict.py)
of the first finetune.eval_examples validation records (0 = all) to the eval record. The value
the checkpointer keeps the best of (its lowest `eval_loss`) is the loss, or minus the metric for
a metric where higher is better, so `--step best` is the best by finetune.metric.
"""
from __future__ import annotations

from typing import Any

from data.tokenizer import Tokenizer
from train.finetune import predict
from train.setup import Setup

DEFAULT_METRIC = {"classify": "accuracy", "tag": "f1", "text2text": "chrf"}


def metric_name(config) -> str:
    return config.finetune.get("metric") or DEFAULT_METRIC.get(config.train.objective, "loss")


def task_eval(setup: Setup, params: Any, tokenizer: Tokenizer) -> dict[str, float]:
    """The scalar task metrics on the eval split ({} for pretraining objectives)."""
    config = setup.config
    if config.train.objective not in DEFAULT_METRIC:
        return {}
    found, _ = predict.evaluate_task(setup, params, tokenizer, config.data.eval_split,
                                     config.finetune.eval_examples)
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}


def selection_value(config, record: dict[str, float] | None) -> float | None:
    """What keep-best minimises: the loss, or minus finetune.metric."""
    if not record:
        return None
    name = metric_name(config)
    return record["loss"] if name == "loss" else -record[name]


class EarlyStopping:
    """True once finetune.patience evaluations in a row did not improve on the best value.

    `saved` is `state()` as a checkpoint kept it, so that a resumed run goes on counting the
    evaluations without improvement instead of starting over."""

    def __init__(self, patience: int, saved: dict[str, Any] | None = None):
        self.patience, self.best, self.waited = patience, None, 0
        if saved:
            self.best, self.waited = saved.get("best"), int(saved.get("waited", 0))

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "waited": self.waited}

    def stop(self, value: float | None) -> bool:
        if not self.patience or value is None:
            return False
        if self.best is None or value < self.best:
            self.best, self.waited = value, 0
            return False
        self.waited += 1
        return self.waited >= self.patience
