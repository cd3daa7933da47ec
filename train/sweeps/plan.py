"""A sweep's plan: every trial's config resolved and validated before anything runs, the trials'
run directories and commands, `OUT/sweep.json`, and what each trial's run directory says about
it (done, interrupted, failed, pending).

Each trial is an ordinary Loom run, `python -m train --config CONFIG --workdir OUT/<name>
<shared --config.* overrides> <the trial's overrides>`, so its config.json holds the full
override set and train.eval, train.generate, resume and export work on it unchanged. The
launchers append each attempt's output to `OUT/<name>/train.log` between two marker lines
(`ATTEMPT` and `EXIT`), which is how a trial's state is read back whoever launched it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shlex
from pathlib import Path
from typing import Any, Sequence

from ml_collections import ConfigDict

from configs.loader import apply_overrides, load, override
from errors import ConfigError, LoomError
from train.config import validate
from train.sweeps import space

SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"
ATTEMPT = "== sweep: attempt started "
EXIT = "== sweep: exit "
PREEMPTED = ": checkpointed step"   # train.loop's line when a signal ended the run early
STATES = ("done", "running", "interrupted", "failed", "pending")


@dataclasses.dataclass
class Trial:
    name: str
    overrides: dict[str, str]          # swept key -> its --config text
    values: dict[str, Any]             # swept key -> the value the config holds
    steps: int                         # train.steps of the trial's resolved config

    def args(self, shared: Sequence[str]) -> list[str]:
        """`python -m train` arguments after --config and --workdir."""
        return [*shared, *(f"--config.{k}={v}" for k, v in self.overrides.items())]


@dataclasses.dataclass
class Sweep:
    out: Path
    config: str                        # the experiment file, as given
    shared: list[str]                  # --config.* overrides every trial gets
    dims: list[space.Dimension]
    trials: list[Trial]
    random: int = 0                    # trials drawn (0 = grid)
    seed: int = 0

    def run_dir(self, trial: Trial) -> Path:
        return self.out / trial.name

    def command(self, trial: Trial, python: str = "python", absolute: bool = False) -> list[str]:
        config, workdir = Path(self.config), self.run_dir(trial)
        if absolute:
            config, workdir = config.absolute(), workdir.absolute()
        return [python, "-m", "train", "--config", str(config), "--workdir", str(workdir),
                "--no-progress", *trial.args(self.shared)]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "shared": self.shared, "random": self.random,
                "seed": self.seed,
                "sweep": [{"key": d.key, "spec": d.spec, "kind": d.kind} for d in self.dims],
                "trials": [{**dataclasses.asdict(t),
                            "command": shlex.join(self.command(t))} for t in self.trials]}


def _trial_config(config: ConfigDict, overrides: dict[str, str]) -> ConfigDict:
    cfg = ConfigDict(config.to_dict())
    for key, text in overrides.items():
        try:
            override(cfg, key, text)
        except ConfigError as e:
            raise ConfigError(f"--sweep {key}={text}: {e}") from e.__cause__
    return cfg


def resolve(out: str | Path, config_path: str, shared: Sequence[str], sweeps: Sequence[str], *,
            random: int = 0, seed: int = 0, devices: Sequence[Any] | None = None) -> Sweep:
    """Parses the sweep, builds every trial's config and validates each one (on `devices`, the
    ones a trial will get), so a bad key or value in any trial stops the sweep here, in one
    line, before any run starts."""
    dims = space.parse(sweeps)
    base = apply_overrides(load(config_path), shared)
    shared_keys = {a[len("--config."):].partition("=")[0] for a in shared}
    both = [d.key for d in dims if d.key in shared_keys]
    if both:
        raise ConfigError(f"{both[0]} is both swept (--sweep) and fixed (--config.{both[0]}); "
                          "drop one of them")
    for d in dims:   # each listed value once, so a bad one is named even if it is never drawn
        for text in d.values:
            _trial_config(base, {d.key: text})
    overrides = space.random(dims, random, seed) if random else space.grid(dims)
    configs = [_trial_config(base, o) for o in overrides]
    values = [{k: _get(cfg, k) for k in o} for o, cfg in zip(overrides, configs)]
    names = space.names(values)
    for name, cfg in zip(names, configs):
        try:
            validate(cfg, devices)
        except LoomError as e:
            raise type(e)(f"trial {name}: {e}") from e.__cause__   # the same error, named
    trials = [Trial(n, o, v, int(cfg.train.steps))
              for n, o, v, cfg in zip(names, overrides, values, configs)]
    return Sweep(Path(out), config_path, list(shared), dims, trials, random, seed)


def _get(cfg: ConfigDict, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, tuple) else cfg


def write(sweep: Sweep, statuses: dict[str, dict[str, Any]] | None = None) -> Path:
    """`OUT/sweep.json`: the plan, and the trials' states if known."""
    data = sweep.to_json()
    for t in data["trials"]:
        t.update((statuses or {}).get(t["name"], {}))
    path = sweep.out / SWEEP_FILE
    sweep.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def read(out: str | Path) -> dict[str, Any]:
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; is --out the directory of a sweep?")
    return json.loads(path.read_text())


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text.split()[0], "%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, IndexError):
        return None


def error_line(output: str) -> str:
    """The one line that says why a run failed: Loom's `error: ...` line, else the last line
    of a traceback, else the last line written."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    tail = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (tail or lines or ["no output"])[-1][:300]


def status(run: Path, steps: int) -> dict[str, Any]:
    """A trial's state from its run directory: `done` (the checkpoint of the last step exists,
    or the last attempt exited 0, as a run ended by data.num_epochs does, unless a signal
    stopped it after a mid-run checkpoint), `failed` (the last
    attempt exited non-zero; `error` is its one line), `interrupted` (an attempt started and
    never ended, e.g. a killed job: the next one resumes from its checkpoint), `pending`
    (never started). `attempts` and `wall_s` (the attempts' summed duration) as well."""
    log = run / LOG_FILE
    text = log.read_text(errors="replace") if log.is_file() else ""
    attempts = text.split(ATTEMPT)[1:]
    wall, code, last_output = 0.0, None, ""
    for attempt in attempts:
        head, _, rest = attempt.partition("\n")
        start = _time(head)
        body, ended, tail = rest.rpartition(EXIT)
        if not ended:
            code, last_output = None, rest
            continue
        parts = tail.split()
        code = int(parts[0]) if parts and parts[0].lstrip("-").isdigit() else 1
        end = _time(parts[1]) if len(parts) > 1 else None
        if start and end:
            wall += (end - start).total_seconds()
        last_output = body
    out: dict[str, Any] = {"attempts": len(attempts), "wall_s": wall, "error": ""}
    # a preempted run (SIGTERM/SIGINT) also exits 0, after checkpointing mid-run: not done
    preempted = code == 0 and PREEMPTED in last_output
    if (run / "checkpoints" / str(steps)).is_dir() or (attempts and code == 0 and not preempted):
        return {**out, "status": "done"}
    if attempts and code is not None and not preempted:
        return {**out, "status": "failed", "error": error_line(last_output)}
    if attempts or (run / "metrics.jsonl").is_file():
        return {**out, "status": "interrupted"}
    return {**out, "status": "pending"}
