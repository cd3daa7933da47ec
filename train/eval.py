"""Evaluation: summed loss/accuracy over a fixed number of batches -> loss, perplexity, accuracy."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import jax
import numpy as np


def evaluate(eval_step: Callable[..., dict[str, jax.Array]], params: Any,
             batches: Iterator[dict[str, jax.Array]], num_batches: int) -> dict[str, float]:
    """Token-weighted means over `num_batches` batches (not a mean of per-batch means)."""
    totals: dict[str, float] = {}
    for _ in range(num_batches):
        sums = jax.device_get(eval_step(params, next(batches)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    weight = max(totals.pop("weight"), 1.0)
    out = {k: v / weight for k, v in totals.items()}
    out["perplexity"] = math.exp(min(out["loss"], 700.0))
    out["tokens"] = weight
    return out
