"""PNG figures of runs and sweeps, drawn from what the runs wrote (`metrics.jsonl`, `config.json`):
train and eval curves of one or more runs (`python -m train.plot`, and the `curves.png` every
training run keeps up to date in its workdir), and a sweep's final metric against each swept key.

matplotlib's Agg backend and its object API (no pyplot, no global figure state), so drawing works
without a display and from any thread. Figure sizes are stated in pixels (`PANEL_PX`), and files
are written to a temporary name and renamed, so a viewer never sees half a PNG.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from errors import DataError

log = logging.getLogger("train")

DPI = 100
PANEL_PX = (900, 450)          # width x height of one panel, in pixels
CURVES_FILE = "curves.png"
DEFAULT_METRICS = ("loss", "eval/loss")
X_AXES = ("step", "tokens")


def read_records(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `<run>/metrics.jsonl`; eval records' keys are prefixed `eval/` (as in
    TensorBoard), so "loss" is the training loss and "eval/loss" the validation loss."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; is {run} the workdir of a training run?")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # a line cut short by a killed run
            continue
        split = record.pop("split", None)
        if split:
            record = {"step": record["step"],
                      **{f"{split}/{k}": v for k, v in record.items() if k != "step"}}
        records.append(record)
    return records


def series(records: Iterable[Mapping[str, Any]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, in step order, the last record of a step winning (a
    resumed run logs again the steps after its last checkpoint)."""
    points = {int(r["step"]): float(r[metric]) for r in records
              if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)}
    steps = np.array(sorted(points), dtype=np.int64)
    return steps, np.array([points[s] for s in steps], dtype=np.float64)


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    if weight <= 0 or len(values) < 2:
        return values
    out, avg = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def tokens_per_step(run: str | os.PathLike) -> int:
    """Tokens a step reads (data.batch_size x data.seq_len of the run's config.json)."""
    path = Path(run) / "config.json"
    try:
        data = json.loads(path.read_text())["data"]
        return int(data["batch_size"]) * int(data["seq_len"])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"--x tokens needs {path} with data.batch_size and data.seq_len") from e


def _figure(panels: int):
    from matplotlib.figure import Figure   # deferred: only plotting pays for matplotlib
    width, height = PANEL_PX
    fig = Figure(figsize=(width / DPI, height * panels / DPI), dpi=DPI, layout="constrained")
    return fig, [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]


def _save(fig, out: str | os.PathLike) -> tuple[int, int]:
    """Writes the figure as a PNG (atomically); returns its (width, height) in pixels."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)   # left only when writing failed
    width, height = fig.get_size_inches() * DPI
    return round(width), round(height)


def _panels(metrics: Sequence[str]) -> list[list[str]]:
    """Metrics grouped by panel: a metric and its eval/ counterpart share one."""
    groups: dict[str, list[str]] = {}
    for m in metrics:
        groups.setdefault(m.split("/", 1)[-1], []).append(m)
    return list(groups.values())


AUTO_SMOOTHING, AUTO_SMOOTHING_POINTS = 0.6, 50


def plot_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
              metrics: Sequence[str] = DEFAULT_METRICS, smoothing: float | None = 0.0,
              x: str = "step", labels: Sequence[str] | None = None) -> tuple[int, int]:
    """Curves of `metrics` for each run, one panel per metric (train and eval of the same
    quantity share a panel: solid train, dashed eval with markers), one colour per run. Train
    curves are smoothed by `smoothing` (0 = raw; the raw curve stays, faint; None = 0.6 for a
    curve of 50 points or more, else raw, as the figures Loom draws by itself do). Returns the
    PNG's (width, height) in pixels."""
    if x not in X_AXES:
        raise DataError(f"--x {x!r}: choose one of {', '.join(X_AXES)}")
    if smoothing is not None and not 0 <= smoothing < 1:
        raise DataError(f"--smooth {smoothing}: use a weight in [0, 1) (0 = no smoothing)")
    labels = list(labels) if labels else [Path(r).name or str(r) for r in runs]
    records = [read_records(r) for r in runs]
    groups = _panels(metrics)
    fig, axes = _figure(len(groups))
    drawn = set()
    for i, (run, rows) in enumerate(zip(runs, records)):
        color = f"C{i % 10}"
        scale = tokens_per_step(run) if x == "tokens" else 1
        for ax, group in zip(axes, groups):
            for metric in group:
                steps, values = series(rows, metric)
                if not len(steps):
                    continue
                drawn.add(metric)
                xs = steps * scale
                if "/" in metric:      # eval (or another split): few points, drawn as they are
                    ax.plot(xs, values, "--o", color=color, markersize=3,
                            label=f"{labels[i]} {metric}")
                else:
                    weight = smoothing if smoothing is not None else \
                        AUTO_SMOOTHING if len(values) >= AUTO_SMOOTHING_POINTS else 0.0
                    if weight > 0:
                        ax.plot(xs, values, color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(xs, smooth(values, weight), color=color,
                            label=f"{labels[i]} {metric}")
    missing = [m for m in metrics if m not in drawn]
    if len(missing) == len(metrics):
        known = sorted({k for rows in records for r in rows for k, v in r.items()
                        if isinstance(v, (int, float)) and k != "step"})
        raise DataError(f"no run has {', '.join(missing)} in its metrics.jsonl; metrics there: "
                        f"{', '.join(known)}")
    for ax, group in zip(axes, groups):
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        ax.set_ylabel(group[0].split("/", 1)[-1])
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small", ncol=2 if len(runs) > 4 else 1)
    return _save(fig, out)


def write_run_curves(workdir: str | os.PathLike) -> Path | None:
    """Redraws `<workdir>/curves.png` (train and eval loss) from the run's metrics.jsonl; the
    training loop calls it after each eval. None, with a warning, if matplotlib is missing or
    the figure cannot be written (a full disk must not stop the run here)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None
    out = Path(workdir) / CURVES_FILE
    try:
        plot_runs([workdir], out, labels=[""], smoothing=None)
    except Exception as e:   # noqa: BLE001 - a figure must never stop a training run
        log.warning("could not draw %s (%s: %s); training goes on", out, type(e).__name__, e)
        return None
    return out


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def log_scale(key: str, values: Sequence[Any], spec: str = "") -> bool:
    """Whether a swept key reads best on a log axis: learning rates, loguniform draws, and
    positive numbers spanning two decades or more."""
    if not _numeric(values) or min(values) <= 0:
        return False
    return (key.split(".")[-1].endswith("lr") or spec.startswith("loguniform")
            or max(values) / min(values) >= 100)


def plot_against(key: str, rows: Sequence[Mapping[str, Any]], metric: str,
                 out: str | os.PathLike, *, others: Sequence[str] = (), spec: str = ""
                 ) -> tuple[int, int]:
    """`metric` of each finished trial (rows of `values` and `metric`) against swept `key`: one
    line per combination of the `others` swept keys (a grid) or scattered points (random search).
    Log axis per `log_scale`; text values are placed as categories."""
    fig, (ax,) = _figure(1)
    points = [r for r in rows if isinstance(r.get(metric), (int, float))
              and math.isfinite(r[metric])]
    xs_all = [r["values"][key] for r in points]
    categories = None if _numeric(xs_all) else sorted({str(v) for v in xs_all})
    place = (lambda v: v) if categories is None else (lambda v: categories.index(str(v)))
    groups: dict[tuple, list] = {}
    for r in points:
        groups.setdefault(tuple(r["values"][o] for o in others), []).append(r)
    grid = all(len(g) > 1 for g in groups.values())
    for i, (combo, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        members = sorted(members, key=lambda r: place(r["values"][key]))
        label = ", ".join(f"{o.split('.')[-1]}={v}" for o, v in zip(others, combo)) or None
        ax.plot([place(r["values"][key]) for r in members], [r[metric] for r in members],
                "-o" if grid else "o", color=f"C{i % 10}", label=label)
    if categories is not None:
        ax.set_xticks(range(len(categories)), categories)
    elif log_scale(key, xs_all, spec):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {key} ({len(points)} finished trials)")
    ax.grid(alpha=0.3, which="both")
    if any(label for label in ax.get_legend_handles_labels()[1]):
        ax.legend(fontsize="small")
    return _save(fig, out)
