"""A sweep's results, from what its trials' run directories hold: `OUT/results.csv` and
`OUT/results.md` (one row per trial, sorted by the target metric), PNG plots (the target against
each swept key, every trial's train and eval loss on one figure) and TensorBoard hparams
(`OUT/tensorboard/<trial>`: `tensorboard --logdir OUT` compares the trials in its HParams tab).

Every number is read from the trial's own metrics.jsonl: final = the eval at the last evaluated
step, best = the lowest (or, with `maximize`, the highest) over the run's evals.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Sequence

from errors import ConfigError
from train import plots
from train.sweeps import plan

CSV_FILE, MD_FILE, CURVES_FILE = "results.csv", "results.md", "curves.png"
EVAL_COLUMNS = ("loss", "perplexity")


def _row(out: Path, trial: dict[str, Any], target: str, maximize: bool) -> dict[str, Any]:
    run = out / trial["name"]
    row: dict[str, Any] = {"trial": trial["name"], "values": trial["values"],
                           **plan.status(run, trial["steps"])}
    records = plots.read_records(run) if (run / "metrics.jsonl").is_file() else []
    train = [r for r in records if "loss" in r and "eval/loss" not in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    row["steps"] = max((r["step"] for r in train), default=0)
    speeds = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), float)]
    row["tokens_per_s"] = statistics.median(speeds) if speeds else None
    metrics = [f"eval/{m}" for m in EVAL_COLUMNS] + ([target] if target not in
                                                     (f"eval/{m}" for m in EVAL_COLUMNS) else [])
    for metric in metrics:
        _, values = plots.series(records if metric.startswith("eval/") else train, metric)
        finite = [float(v) for v in values if math.isfinite(v)]
        row[f"final {metric}"] = float(values[-1]) if len(values) else None
        higher = maximize if metric == target else "accuracy" in metric
        best = max if higher else min
        row[f"best {metric}"] = best(finite) if finite else None
    row["target"] = row[f"final {target}"]
    row["evals"] = len(evals)
    return row


def rows(out: str | Path, target: str = "eval/loss", maximize: bool = False
         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep's sweep.json and one row per trial, finished trials first, sorted by the final
    value of `target` (lowest first, or highest with `maximize`)."""
    out = Path(out)
    sweep = plan.read(out)
    table = [_row(out, t, target, maximize) for t in sweep["trials"]]
    if target not in {k[len("final "):] for r in table for k, v in r.items()
                      if k.startswith("final ") and v is not None} and \
            any(r["status"] == "done" for r in table):
        raise ConfigError(f"--target {target}: no finished trial logged it; use a key of "
                          "metrics.jsonl such as eval/loss, eval/accuracy or loss")
    sign = -1 if maximize else 1

    def order(r):
        missing = r["target"] is None or not math.isfinite(r["target"])
        return (r["status"] != "done", missing, sign * r["target"] if not missing else 0.0)
    return sweep, sorted(table, key=order)


def _columns(sweep: dict[str, Any], table: Sequence[dict[str, Any]]) -> list[str]:
    keys = [d["key"] for d in sweep["sweep"]]
    metrics = [k for k in table[0] if k.startswith(("final ", "best "))] if table else []
    return ["trial", *keys, "status", "steps", *metrics, "tokens_per_s", "wall_s", "error"]


def _cell(row: dict[str, Any], column: str) -> Any:
    return row["values"][column] if column in row["values"] else row.get(column)


def write_csv(path: Path, columns: Sequence[str], table: Sequence[dict[str, Any]]) -> None:
    """Full precision (`repr` of floats), so the numbers equal the runs' metrics.jsonl."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in table:
            writer.writerow(["" if (v := _cell(r, c)) is None else
                             repr(v) if isinstance(v, float) else v for c in columns])


def _md(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value).replace("|", "\\|")


def write_md(path: Path, columns: Sequence[str], table: Sequence[dict[str, Any]],
             title: str) -> None:
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_md(_cell(r, c)) for c in columns) + " |" for r in table]
    path.write_text("\n".join(lines) + "\n")


def write_hparams(out: Path, sweep: dict[str, Any], table: Sequence[dict[str, Any]]) -> None:
    """One TensorBoard hparams session per trial that logged an eval, in OUT/tensorboard/<name>
    (rewritten on each collect)."""
    from tensorboardX import SummaryWriter   # deferred: only collecting writes summaries
    from tensorboardX.summary import hparams
    root = out / "tensorboard"
    for r in table:
        shutil.rmtree(root / r["trial"], ignore_errors=True)
        metrics = {f"hparams/{k.replace(' ', '_')}": v for k, v in r.items()
                   if k.startswith(("final ", "best ")) and isinstance(v, float)
                   and math.isfinite(v)}
        if not metrics:
            continue
        values = {k: v if isinstance(v, (bool, str, int, float)) else json.dumps(v)
                  for k, v in r["values"].items()}
        with SummaryWriter(str(root / r["trial"])) as w:
            for summary in hparams(values, metrics):
                w.file_writer.add_summary(summary)
            for k, v in metrics.items():
                w.add_scalar(k, v, r["steps"])


def collect(out: str | Path, target: str = "eval/loss", maximize: bool = False
            ) -> dict[str, Any]:
    """Writes results.csv, results.md, the plots and the hparams from what has finished (and
    what has not: a trial without an eval gets a row with its status); returns what it wrote,
    `{"rows": ..., "files": {path: (width, height) or None}}`."""
    out = Path(out)
    sweep, table = rows(out, target, maximize)
    columns = _columns(sweep, table)
    files: dict[str, Any] = {}
    write_csv(out / CSV_FILE, columns, table)
    write_md(out / MD_FILE, columns, table, f"Sweep {out.name}: {len(table)} trials, sorted by "
             f"final {target} ({'highest' if maximize else 'lowest'} first)")
    files[str(out / CSV_FILE)] = files[str(out / MD_FILE)] = None
    finished = [r for r in table if r["target"] is not None]
    keys = [d["key"] for d in sweep["sweep"]]
    specs = {d["key"]: d["spec"] for d in sweep["sweep"]}
    if finished:
        for key in keys:
            path = out / f"{target.replace('/', '_')}_vs_{key.split('.')[-1]}.png"
            files[str(path)] = plots.plot_against(
                key, finished, f"final {target}", path, others=[k for k in keys if k != key] if
                not sweep["random"] else (), spec=specs[key])
    started = [r["trial"] for r in table if (out / r["trial"] / "metrics.jsonl").is_file()]
    if started:
        files[str(out / CURVES_FILE)] = plots.plot_runs(
            [out / name for name in started], out / CURVES_FILE, smoothing=None)
    write_hparams(out, sweep, table)
    return {"rows": table, "files": files}
