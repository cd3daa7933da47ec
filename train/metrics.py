"""Run metrics to three places: the console (with a progress bar), TensorBoard event files and
`<workdir>/metrics.jsonl` (one JSON object per record, always with `step`).

On the console, the run's own lines (metrics, `console`) go to stdout and the bar and log lines to
stderr; all of them from process 0 only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter
from tqdm.contrib.logging import logging_redirect_tqdm

# Dense bf16 peak TFLOP/s per chip (datasheet), matched against jax's device_kind.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def peak_tflops(configured: float = 0.0) -> float | None:
    """Per-device peak: the configured figure, else a known accelerator's, else None (CPU)."""
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def throughput(step_seconds: float, tokens_per_step: int, flops_per_token: float,
               peak: float | None) -> dict[str, float]:
    """tokens/s, model TFLOP/s (all devices) and MFU (model FLOPs over all devices' peak)."""
    tflops = flops_per_token * tokens_per_step / step_seconds / 1e12
    out = {"step_time": step_seconds, "tokens_per_s": tokens_per_step / step_seconds,
           "model_tflops": tflops}
    if peak:
        out["mfu"] = tflops / (peak * jax.device_count())
    return out


def console(text: str) -> None:
    """Prints a line of the run's report to stdout, on process 0 only, above the progress bar
    if one is showing; flushed, so it keeps its place among the log lines on stderr."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def _on_terminal() -> bool:
    """Whether stdout and stderr are both a terminal: a bar redrawn with carriage returns is
    noise in a file or a pipe, and stdout through a pipe (`| tee`) lags behind the bar."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def _plain(value: Any) -> Any:
    value = np.asarray(value).item() if hasattr(value, "shape") or isinstance(value, np.generic) \
        else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Writes records on process 0 only; every process may call it.

    The progress bar shows only with `progress` and a terminal; while it shows, console log
    lines are written above it too (tqdm's logging redirect), and `close` puts them back.
    """

    def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int = 0,
                 progress: bool = True, filename: str = "metrics.jsonl"):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        workdir = Path(workdir)
        path = workdir / filename
        cut = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        self.jsonl = open(path, "a", buffering=1)
        if cut:   # a killed run's last record was cut short: start the next on its own line
            self.jsonl.write("\n")
        self.tb = SummaryWriter(str(workdir / "tensorboard"))
        show = progress and _on_terminal()
        self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not show,
                             dynamic_ncols=True, desc="train")
        self.redirect = contextlib.ExitStack()
        if show:
            self.redirect.enter_context(logging_redirect_tqdm())

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Records `metrics` at `step`; keys are prefixed (e.g. "eval/") in TensorBoard."""
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if not self.active:
            return record
        if prefix:
            record = {"step": record.pop("step"), "split": prefix.rstrip("/"), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(prefix + k, v, step)
        shown = {k: v for k, v in record.items() if isinstance(v, float)}
        line = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        console(f"[{prefix or 'train/'}step {step}] {line}")
        return record

    def advance(self, step: int, loss: float | None = None) -> None:
        if self.active:
            self.bar.n = step
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.refresh()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.active:
            self.tb.add_text(tag, text, step)
            self.jsonl.write(json.dumps({"step": int(step), tag: text}) + "\n")

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.redirect.close()
            self.tb.close()
            self.jsonl.close()
