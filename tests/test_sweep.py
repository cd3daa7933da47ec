"""Sweeps end to end: a 2x2 grid of tiny real runs on the test corpus through `python -m
train.sweep` subprocesses (the local launcher's real path), stopped part-way and run again, then
its results table, plots, hparams and SLURM script; random search; bad --sweep input."""
import csv
import json
import math
import os
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from matplotlib.image import imread

from conftest import CORPUS_DOCS
from errors import ConfigError
from train import plot as plot_cli
from train import plots
from train.sweeps import launch, plan, space

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["lr=0.001,n_layers=1", "lr=0.001,n_layers=2", "lr=0.003,n_layers=1",
         "lr=0.003,n_layers=2"]
GRID = ["--sweep", "opt.lr=1e-3,3e-3", "--sweep", "model.n_layers=1,2"]


def _env() -> dict[str, str]:
    """This session's XLA_FLAGS (8 CPU devices) and compilation cache, on CPU."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def shared(data_dir: str, tokenizer_path: str, **changes) -> list[str]:
    """--config.* overrides turning the quickstart config into a tiny run on the test corpus."""
    overrides = {
        "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 64,
        "model.max_len": 64, "data.max_docs": CORPUS_DOCS, "data.validation_percent": 10.0,
        "data.data_dir": data_dir, "data.seq_len": 32, "data.batch_size": 8,
        "data.interleave": 8, "data.shuffle_window": 64, "data.tokenizer.path": tokenizer_path,
        "train.steps": 16, "train.log_every": 2, "eval.every": 8, "eval.steps": 2,
        "eval.sample_prompt": "", "ckpt.every": 4, "ckpt.async_save": False, **changes}
    return [f"--config.{k}={v}" for k, v in overrides.items() if v is not None]


def sweep_cli(*args) -> list[str]:
    return [sys.executable, "-m", "train.sweep", "--config", "configs/quickstart.py", *args]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(data_dir, tokenizer_path, tmp_path_factory):
    """A 2x2 sweep, stopped by SIGTERM while its second trial runs, then run again with two
    trials at a time (4 of the 8 CPU devices each). Returns (out, before, outputs)."""
    out = tmp_path_factory.mktemp("sweeps") / "grid"
    command = sweep_cli("--out", str(out), *GRID, *shared(data_dir, tokenizer_path))
    first = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while first.poll() is None and not (out / NAMES[1] / "checkpoints" / "4").is_dir():
        assert time.monotonic() < deadline, "the second trial never reached its checkpoint"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    first_out = first.communicate(timeout=120)[0]
    assert first.returncode == 130, first_out
    before = {name: plan.status(out / name, 16) for name in NAMES}
    before["metrics0"] = (out / NAMES[0] / "metrics.jsonl").read_bytes()
    again = subprocess.run(command + ["--parallel", "2"], cwd=ROOT, env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert again.returncode == 0, again.stdout
    return out, before, (first_out, again.stdout)


def test_an_interrupted_sweep_run_again_finishes_only_what_was_missing(finished):
    out, before, (first_out, again_out) = finished
    assert [before[n]["status"] for n in NAMES] == ["done", "interrupted", "pending", "pending"]
    assert "interrupted" in first_out and "Traceback" not in first_out
    assert "(1 done already, 3 to run, 2 at a time)" in again_out, again_out
    assert f"[{NAMES[0]}] started" not in again_out and f"[{NAMES[1]}] started (resuming)" \
        in again_out
    # the finished trial was left alone; the interrupted one resumed rather than restarted
    assert (out / NAMES[0] / "metrics.jsonl").read_bytes() == before["metrics0"]
    assert plan.status(out / NAMES[0], 16)["attempts"] == 1
    assert plan.status(out / NAMES[1], 16)["attempts"] == 2
    resumed = [r["step"] for r in records(out / NAMES[1]) if "loss" in r and "split" not in r]
    assert resumed.count(2) == resumed.count(4) == 1 and max(resumed) == 16, resumed
    for name in NAMES:
        assert plan.status(out / name, 16)["status"] == "done"
        saved = json.loads((out / name / "config.json").read_text())
        lr, layers = name.split(",")
        assert saved["opt"]["lr"] == float(lr.split("=")[1])
        assert saved["model"]["n_layers"] == int(layers.split("=")[1])
        assert saved["train"]["steps"] == 16 and saved["model"]["d_model"] == 32   # shared
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    assert [t["name"] for t in trials] == NAMES
    assert all(t["status"] == "done" for t in trials)


def test_the_results_table_has_each_runs_own_numbers_sorted_by_eval_loss(finished):
    out = finished[0]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == NAMES
    finals = [float(r["final eval/loss"]) for r in rows]
    assert finals == sorted(finals)
    for row in rows:
        logged = records(out / row["trial"])
        evals = [r for r in logged if r.get("split") == "eval"]
        train = [r for r in logged if "split" not in r and "loss" in r]
        assert float(row["final eval/loss"]) == evals[-1]["loss"]
        assert float(row["best eval/loss"]) == min(r["loss"] for r in evals)
        assert float(row["final eval/perplexity"]) == evals[-1]["perplexity"]
        assert float(row["tokens_per_s"]) == statistics.median(
            r["tokens_per_s"] for r in train if "tokens_per_s" in r)
        assert int(row["steps"]) == 16 and row["status"] == "done" and not row["error"]
        assert float(row["opt.lr"]) == json.loads((out / row["trial"] / "config.json")
                                                  .read_text())["opt"]["lr"]
        assert float(row["wall_s"]) > 0
    table = (out / "results.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| lr=")]
    assert [line.split(" | ")[0][2:] for line in body] == [r["trial"] for r in rows]


def _tfevents(directory: Path) -> list[bytes]:
    """The raw event protos of a TensorBoard directory (TFRecord framing)."""
    events = []
    for path in directory.glob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(data[at + 12:at + 12 + length])
            at += 12 + length + 4
    return events


def test_plots_and_hparams_of_the_sweep(finished):
    out = finished[0]
    width, height = plots.PANEL_PX
    for png in ("curves.png", "eval_loss_vs_lr.png", "eval_loss_vs_n_layers.png",
                *(f"{name}/curves.png" for name in NAMES)):
        image = imread(out / png)
        assert image.shape == (height, width, 4), png
        assert image[..., :3].std() > 0.05, png      # something is drawn on it
    for name in NAMES:
        events = b"".join(_tfevents(out / "tensorboard" / name))
        assert b"hparams" in events and b"opt.lr" in events and b"final_eval/loss" in events


def test_plot_cli_draws_runs_by_tokens_with_a_panel_per_metric(finished, tmp_path, capsys):
    out = finished[0]
    png = tmp_path / "two.png"
    plot_cli.main([str(out / NAMES[0]), str(out / NAMES[3]), "--out", str(png), "--metric",
                   "loss", "--metric", "eval/loss", "--metric", "lr", "--smooth", "0.5",
                   "--x", "tokens"])
    width, height = plots.PANEL_PX
    assert f"({width}x{2 * height} px, 2 run(s))" in capsys.readouterr().out
    assert imread(png).shape == (2 * height, width, 4)
    with pytest.raises(SystemExit) as exit_:
        plot_cli.main([str(out / NAMES[0]), "--out", str(png), "--metric", "eval/bleu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval/bleu" in err[0] and "eval/loss" in err[0], err


def test_slurm_script_has_one_array_task_per_trial_and_skips_finished_ones(
        finished, data_dir, tokenizer_path):
    out = finished[0]
    run = subprocess.run(sweep_cli("--out", str(out), *GRID, *shared(data_dir, tokenizer_path),
                                   "--launcher", "slurm", "--sbatch=--gres=gpu:1"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    script = out / launch.SBATCH_FILE
    assert f"sbatch {script}" in run.stdout
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-3\n" in text and "#SBATCH --gres=gpu:1" in text
    for i, name in enumerate(NAMES):
        assert f"  {i}) NAME={shlex.quote(name)}; STEPS=16; set -- " in text
    # a task runs as SLURM would start it; its trial is done, so it only says so
    task = subprocess.run(["bash", str(script)], env={**_env(), "SLURM_ARRAY_TASK_ID": "2"},
                          capture_output=True, text=True, timeout=60)
    assert task.returncode == 0 and f"trial {NAMES[2]} is done already" in task.stdout
    beyond = subprocess.run(["bash", str(script)], env={**_env(), "SLURM_ARRAY_TASK_ID": "4"},
                            capture_output=True, text=True, timeout=60)
    assert beyond.returncode == 2 and "no trial 4" in beyond.stderr


def test_a_failing_trial_is_marked_failed_with_its_error_and_the_others_go_on(
        data_dir, tokenizer_path, tmp_path):
    out = tmp_path / "sweep"
    missing = tmp_path / "no" / "such.model"
    run = subprocess.run(
        sweep_cli("--out", str(out), "--sweep", f"data.tokenizer.path={missing},{tokenizer_path}",
                  *shared(data_dir, None, **{"train.steps": 2, "train.log_every": 1,
                                             "eval.every": 0, "eval.steps": 1, "ckpt.every": 0})),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    with open(out / "results.csv") as f:
        rows = {r["status"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"done", "failed"}
    assert "data.tokenizer.path" in rows["failed"]["error"] and "\n" not in rows["failed"]["error"]
    assert str(missing) in rows["failed"]["error"]
    assert float(rows["done"]["final eval/loss"]) > 0
    assert "failed after" in run.stdout and "1 done, 1 failed" in run.stdout


def test_random_search_with_a_seed_reproduces_its_trials(tmp_path, capsys):
    from train import sweep as sweep_cli_module
    specs = ["opt.lr=loguniform(1e-4,1e-2)", "model.n_layers=int(1,3)",
             "opt.schedule=cosine,linear", "opt.b1=uniform(0.8,0.95)"]
    config_file = ROOT / "configs" / "quickstart.py"
    make = lambda seed: plan.resolve(tmp_path / "out", str(config_file), [], specs, random=12,
                                     seed=seed)
    a, b, c = make(0), make(0), make(1)
    assert [t.overrides for t in a.trials] == [t.overrides for t in b.trials]
    assert [t.name for t in a.trials] == [t.name for t in b.trials]
    assert [t.overrides for t in a.trials] != [t.overrides for t in c.trials]
    lrs = [t.values["opt.lr"] for t in a.trials]
    assert all(1e-4 <= v < 1e-2 for v in lrs) and min(lrs) < 1e-3 < max(lrs)
    assert {t.values["model.n_layers"] for t in a.trials} <= {1, 2, 3}
    assert all(0.8 <= t.values["opt.b1"] < 0.95 for t in a.trials)
    assert {t.values["opt.schedule"] for t in a.trials} == {"cosine", "linear"}
    assert len({t.name for t in a.trials}) == 12
    for t in a.trials:   # the override text parses back to exactly the drawn value
        assert float(t.overrides["opt.lr"]) == t.values["opt.lr"]
    # the CLI prints the same commands for the same seed
    argv = ["--config", str(config_file), "--out", str(tmp_path / "cli"), "--random", "12",
            "--seed", "0", "--launcher", "print", *(f"--sweep={s}" for s in specs)]
    sweep_cli_module.main(argv)
    first = capsys.readouterr().out
    sweep_cli_module.main(argv)
    assert capsys.readouterr().out == first and len(first.splitlines()) == 12
    assert [n for n in first.split() if n.startswith("--config.opt.lr=")] == \
        [f"--config.opt.lr={t.overrides['opt.lr']}" for t in a.trials]
    grid = plan.resolve(tmp_path / "g", str(config_file), ["--config.train.steps=3"],
                        ["opt.lr=1e-3,2e-3,4e-3", "model.n_layers=1,2"])
    assert [tuple(t.overrides.values()) for t in grid.trials] == [
        (lr, n) for lr in ("1e-3", "2e-3", "4e-3") for n in ("1", "2")]
    assert all(t.steps == 3 for t in grid.trials)


@pytest.mark.parametrize("sweep, expected", [
    (["opt.lrr=1e-3,2e-3"], ("unknown config key 'opt.lrr'", "did you mean opt.lr")),
    (["opt.lr=1e-3,fast"], ("--sweep opt.lr=fast", "expected a float")),
    (["model.n_heads=4,5"], ("trial n_heads=5", "model.n_heads=5")),
    (["opt.lr=loguniform(1e-4,1e-2)"], ("draws random values", "--random N")),
    (["opt.lr=1e-3", "--random", "2", "--sweep", "opt.lr=loguniform(1e-4,1e-2)"],
     ("given twice",)),
    (["opt.lr"], ("expected KEY=VALUES",)),
])
def test_a_bad_sweep_is_one_line_before_anything_starts(tmp_path, sweep, expected):
    out = tmp_path / "sweep"
    run = subprocess.run(sweep_cli("--out", str(out), "--sweep", *sweep), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists()      # no sweep.json, no run directory


def test_devices_are_split_between_parallel_trials():
    cpu = launch.device_slots(2, "cpu", 8, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"
                                                          " --xla_cpu_foo=1"})
    assert cpu == [{"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"}] * 2
    gpu = launch.device_slots(2, "gpu", 4, {"CUDA_VISIBLE_DEVICES": "2,3,5,7"})
    assert gpu == [{"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "5,7"}]
    assert launch.device_slots(4, "gpu", 8, {})[3] == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert launch.device_slots(1, "tpu", 8, {}) == [{}]
    for args, message in [((3, "gpu", 8, {}), "does not divide the 8 gpu devices"),
                          ((2, "tpu", 4, {}), "cannot split tpu devices"),
                          ((0, "cpu", 1, {}), "at least one")]:
        with pytest.raises(ConfigError, match=message):
            launch.device_slots(*args)


def test_space_syntax_and_names():
    dims = space.parse(["opt.lr=1e-3,2e-3", "mesh.rules=((1,2),(3,4)),()",
                        "x.n=choice(a,b)", "y.n=int(1,4)"])
    assert dims[1].values == ("((1,2),(3,4))", "()") and dims[2].kind == "choice"
    assert dims[3].drawn and (dims[3].low, dims[3].high) == (1, 4)
    for bad, message in [("opt.lr=uniform(2,1)", "below the high"),
                         ("opt.lr=loguniform(-1,1)", "must be positive"),
                         ("opt.lr=int(1.5,3)", "whole numbers"),
                         ("opt.lr=uniform(a,1)", "not a finite number"),
                         ("opt.lr=1e-3,1e-3", "listed twice"), ("opt.lr=1e-3,", "empty value")]:
        with pytest.raises(ConfigError, match=message):
            space.parse([bad])
    assert space.names([{"opt.lr": 1e-3, "model.n_layers": 2}]) == ["lr=0.001,n_layers=2"]
    assert space.names([{"a.n": 1, "b.n": "x/y"}, {"a.n": 1, "b.n": "x/y"}]) == [
        "a.n=1,b.n=x_y-0", "a.n=1,b.n=x_y-1"]
    assert plots.log_scale("opt.lr", [1e-3, 2e-3]) and not plots.log_scale("model.n_layers",
                                                                          [1, 2])
    assert not math.isnan(plots.smooth(np.array([1.0, 2.0, 3.0]), 0.9)[0])


def test_a_trial_a_signal_stopped_is_interrupted_not_done(tmp_path):
    """python -m train exits 0 after checkpointing the step a SIGTERM arrived at: resume it."""
    run = tmp_path / "trial"
    (run / "checkpoints" / "8").mkdir(parents=True)
    attempt = f"{plan.ATTEMPT}{plan.now()} local: python -m train\n"
    stopped = ("stopped by SIGTERM: checkpointed step 8 0.2 s after the request; run the same "
               "command to resume\n")
    (run / plan.LOG_FILE).write_text(f"{attempt}{stopped}{plan.EXIT}0 {plan.now()}\n")
    assert plan.status(run, 16)["status"] == "interrupted"
    (run / plan.LOG_FILE).write_text(f"{attempt}data: the 1 epoch(s) of training data ended "
                                     f"after step 8; stopping\n{plan.EXIT}0 {plan.now()}\n")
    assert plan.status(run, 16)["status"] == "done"
