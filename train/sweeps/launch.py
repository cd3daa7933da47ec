"""Running a sweep's trials: `local` (subprocesses, K at a time, each on its own share of the
devices), `slurm` (one sbatch array script, one array task per trial) and `print` (the
commands).

Every launcher skips trials that are done, and runs the others with the same `python -m train`
command, which resumes an interrupted trial from its latest checkpoint. Each attempt's output
goes to `OUT/<name>/train.log` between the marker lines `plan.status` reads.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from errors import ConfigError
from train.sweeps import plan

LAUNCHERS = ("local", "slurm", "print")
SBATCH_FILE = "sweep.sbatch"
_CPU_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def device_slots(parallel: int, platform: str, n_devices: int,
                 env: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment changes that give each of `parallel` concurrent trials its own share of
    the `n_devices` devices (one dict per slot; `[{}]` when trials run one at a time)."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: run at least one trial at a time")
    if parallel == 1:
        return [{}]
    if n_devices > 1 and n_devices % parallel:
        raise ConfigError(f"--parallel {parallel} does not divide the {n_devices} {platform} "
                          f"devices; use a divisor of {n_devices} (each trial gets "
                          f"{n_devices}/K of them)")
    share = max(n_devices // parallel, 1)
    if platform == "gpu":
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
        ids = [d for d in visible.split(",") if d] or [str(i) for i in range(n_devices)]
        if n_devices == 1:   # K trials on one GPU: each may take only its part of the memory
            return [{"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / parallel:.3f}"}] * parallel
        return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * share:(i + 1) * share])}
                for i in range(parallel)]
    if platform == "cpu":
        flags = _CPU_COUNT.sub("", env.get("XLA_FLAGS", "")).strip()
        count = f"--xla_force_host_platform_device_count={share}"
        return [{"XLA_FLAGS": f"{flags} {count}".strip()}] * parallel
    raise ConfigError(f"--parallel {parallel}: the local launcher cannot split {platform} "
                      "devices between processes; use --parallel 1 (each trial gets them all) "
                      "or --launcher slurm")


def print_commands(sweep: plan.Sweep, write: Callable[[str], None] = print) -> None:
    for trial in sweep.trials:
        write(shlex.join(sweep.command(trial)))


def _pending(sweep: plan.Sweep) -> tuple[list[plan.Trial], dict[str, dict[str, Any]]]:
    statuses = {t.name: plan.status(sweep.run_dir(t), t.steps) for t in sweep.trials}
    return [t for t in sweep.trials if statuses[t.name]["status"] != "done"], statuses


def run_local(sweep: plan.Sweep, *, slots: Sequence[dict[str, str]] = ({},),
              env: Mapping[str, str] | None = None, poll_s: float = 0.5,
              write: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Runs the trials that are not done, `len(slots)` at a time, each as a `python -m train`
    subprocess with its slot's environment. A trial that fails is reported with its one-line
    error and the others go on. SIGTERM or Ctrl-C stops the running trials (they resume on the
    next run) and re-raises. Returns every trial's status."""
    env = dict(os.environ if env is None else env)
    todo, statuses = _pending(sweep)
    done = len(sweep.trials) - len(todo)
    write(f"sweep: {len(sweep.trials)} trials in {sweep.out} ({done} done already, "
          f"{len(todo)} to run, {len(slots)} at a time)")
    plan.write(sweep, statuses)
    free, running = list(range(len(slots))), {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while todo or running:
            while todo and free:
                trial, slot = todo.pop(0), free.pop(0)
                running[trial.name] = (*_start(sweep, trial, {**env, **slots[slot]}), slot, trial)
                statuses[trial.name] = {**statuses[trial.name], "status": "running"}
                resumed = " (resuming)" if (sweep.run_dir(trial) / "checkpoints").is_dir() else ""
                write(f"[{trial.name}] started{resumed}")
            time.sleep(poll_s)
            for name, (proc, log, slot, trial) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.write(f"\n{plan.EXIT}{proc.returncode} {plan.now()}\n")
                log.close()
                del running[name]
                free.append(slot)
                statuses[name] = plan.status(sweep.run_dir(trial), trial.steps)
                s = statuses[name]
                write(f"[{name}] {s['status']} after {s['wall_s']:.0f} s"
                      + (f": {s['error']}" if s["error"] else ""))
                plan.write(sweep, statuses)
    except KeyboardInterrupt:
        # no exit line: the attempt was cut short, not failed, and the next run resumes it
        for proc, *_ in running.values():
            proc.terminate()
        for name, (proc, log, _, trial) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            statuses[name] = plan.status(sweep.run_dir(trial), trial.steps)
        plan.write(sweep, statuses)
        write(f"sweep: interrupted; {', '.join(running) or 'no trial'} stopped. Run the same "
              "command again to resume.")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return statuses


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _start(sweep: plan.Sweep, trial: plan.Trial, env: dict[str, str]
           ) -> tuple[subprocess.Popen, Any]:
    """Starts a trial's attempt; its output is appended to its train.log after the marker."""
    run = sweep.run_dir(trial)
    run.mkdir(parents=True, exist_ok=True)
    log = open(run / plan.LOG_FILE, "a")
    command = sweep.command(trial, python=sys.executable)
    log.write(f"{plan.ATTEMPT}{plan.now()} local: {shlex.join(command)}\n")
    log.flush()
    # a session of its own: Ctrl-C reaches the sweep, which stops its trials itself
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True), log


SBATCH = """\
#!/bin/bash
# Loom sweep {out}: {n} trials, one SLURM array task each. Submit with
#   sbatch {script}
# Task i runs trial i of sweep.json (`python -m train ... --workdir {out}/<name>`), appending its
# output to {out}/<name>/train.log; a finished trial is skipped and an interrupted one resumes
# from its latest checkpoint, so resubmitting (or --requeue) continues the sweep. Collect with
#   python -m train.sweep --out {out} --collect
# Multi-node trials: add --nodes=N and --ntasks-per-node=1 below and start the command with
# `srun` on every node, with the multi-host flags of `python -m train` (--coordinator,
# --num-processes, --process-id from $SLURM_PROCID) as in the launch recipes in scripts/.
#SBATCH --job-name={job}
#SBATCH --array=0-{last}{throttle}
#SBATCH --output={out}/slurm/%A_%a.out
#SBATCH --chdir={cwd}
{sbatch}
set -u
PYTHON="${{PYTHON:-{python}}}"
case "${{SLURM_ARRAY_TASK_ID:?not running as a SLURM array task}}" in
{cases}
  *) echo "no trial ${{SLURM_ARRAY_TASK_ID}} in this sweep of {n}" >&2; exit 2 ;;
esac
RUN={out_q}/"$NAME"
if [ -d "$RUN/checkpoints/$STEPS" ]; then
  echo "trial $NAME is done already"; exit 0
fi
mkdir -p "$RUN"
TASK="${{SLURM_ARRAY_JOB_ID:-}}_${{SLURM_ARRAY_TASK_ID}}"
echo "{attempt}$(date -u +%Y-%m-%dT%H:%M:%SZ) slurm $TASK" >> "$RUN/{log}"
"$PYTHON" -m train --config {config} --workdir "$RUN" --no-progress "$@" >> "$RUN/{log}" 2>&1
rc=$?
printf '\\n{exit}%s %s\\n' "$rc" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$RUN/{log}"
exit $rc
"""


def write_slurm(sweep: plan.Sweep, *, sbatch: Sequence[str] = (), parallel: int = 0,
                python: str = sys.executable) -> Path:
    """Writes `OUT/sweep.sbatch`, an array job with one task per trial (task i = trial i), and
    returns its path. `sbatch` adds `#SBATCH` lines (e.g. --gres=gpu:8, --time=4:00:00,
    --partition=...); `parallel` > 0 caps the tasks running at once (`--array=0-N%K`)."""
    out = sweep.out.absolute()
    script = out / SBATCH_FILE
    cases = []
    for i, t in enumerate(sweep.trials):
        args = shlex.join(t.args(sweep.shared))
        cases.append(f"  {i}) NAME={shlex.quote(t.name)}; STEPS={t.steps}; set -- {args} ;;")
    extra = "\n".join(f"#SBATCH {a if a.startswith('-') else '--' + a}" for a in sbatch)
    text = SBATCH.format(
        out=out, out_q=shlex.quote(str(out)), n=len(sweep.trials), script=script,
        job=re.sub(r"[^\w.-]+", "_", f"loom-sweep-{out.name}"), last=len(sweep.trials) - 1,
        throttle=f"%{parallel}" if parallel > 0 else "", cwd=Path.cwd(), sbatch=extra,
        python=python, cases="\n".join(cases),
        config=shlex.quote(str(Path(sweep.config).absolute())),
        attempt=plan.ATTEMPT, exit=plan.EXIT, log=plan.LOG_FILE)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slurm").mkdir(exist_ok=True)
    script.write_text(text)
    return script
