"""The training loop: build everything from the config, resume if a checkpoint exists, train,
evaluate, checkpoint, and end with a text sample."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from data import config as data_config, pipeline
from data.tokenizer import Tokenizer
from errors import ConfigError, TrainingDiverged
from model.sharding import activate
from train import families, resume, state as state_lib, workdir as workdir_lib
from train.checkpoint import Checkpointer, directory as checkpoints_dir
from train.config import validate
from train.decoding import generate
from train.decoding.options import Options
from train.distill import teacher as distill_teacher
from train.evaluation.evaluate import evaluate
from train.finetune import backbone as finetune_backbone, selection
from train.metrics import MetricsLog, console, peak_tflops, throughput
from train.plots import write_run_curves
from train.preempt import Preemption
from train.setup import Setup, build, with_vocab


def _sample(setup: Setup, params: Any, tokenizer: Tokenizer) -> str | None:
    cfg = setup.config.eval
    if not cfg.sample_prompt:   # validate() allows one only for the generative families
        return None
    options = Options("sample" if cfg.sample_temperature > 0 else "greedy",
                      temperature=cfg.sample_temperature, top_k=40)
    with activate(setup.mesh, setup.rules):
        new = generate.generate_text(setup.model_cfg, params, tokenizer, [cfg.sample_prompt],
                                     max_new_tokens=cfg.sample_tokens, options=options,
                                     rng=jax.random.PRNGKey(0))[0]
    return generate.shown(setup.model_cfg, cfg.sample_prompt, new)


def train(config: ConfigDict, workdir: str | Path, *, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) the training run of `config` in `workdir`; returns the last eval.

    `stop_after=k` checkpoints and returns after step k, as a preempted job would; running again
    continues exactly where it stopped. SIGTERM or SIGINT does the same after the step in
    flight (train/preempt.py); the result then has `preempted` set to that step.
    """
    validate(config)
    if config.get("quant", {}).get("mode") == "ptq":   # int kernels, no optimizer state
        raise ConfigError("quant.mode=ptq runs are for inference (train.eval, train.generate); "
                          "train with quant.mode=qat, or fine-tune the float run")
    config = distill_teacher.resolve(config)   # distillation: pin the teacher, its vocabulary
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.lock(workdir, enabled=jax.process_index() == 0), \
            Preemption(config.train.get("preempt_grace_s", 30.0)) as preempt:
        return _train(config, workdir, progress, stop_after, preempt)


def _train(config: ConfigDict, workdir: Path, progress: bool, stop_after: int | None,
           preempt: Preemption) -> dict[str, Any]:
    config = finetune_backbone.resolve(config, workdir)   # fine-tuning: backbone, labels
    tokenizer = pipeline.load_or_train_tokenizer(config.data, workdir)
    config = with_vocab(config, tokenizer)
    setup = build(config)
    if jax.process_index() == 0 and (left := workdir_lib.remove_unfinished_saves(
            checkpoints_dir(workdir))):
        console(f"removed {len(left)} unfinished checkpoint save(s) an earlier run left: "
                f"{', '.join(left)}")
    ckpt = Checkpointer(workdir, config.ckpt)
    last = min(stop_after or config.train.steps, config.train.steps)
    with activate(setup.mesh, setup.rules):
        batches = pipeline.train_batches(config.data, tokenizer, setup.batch_sharding,
                                         objective=config.train.objective)
        teacher = distill_teacher.restore(setup)   # None unless distill.teacher
        state, changes = _initial_state(setup, ckpt, batches, workdir)
        log = MetricsLog(workdir, config.train.steps, int(state.step), progress=progress)
        n_params = state_lib.param_count(state.params)
        reporter = Reporter(log, setup, n_params, config.train.log_every)
        if int(state.step) == 0:
            log.write(0, {"params": n_params, "flops_per_token": reporter.flops})
        elif changes:
            log.text(int(state.step), "resumed_with_changes", json.dumps(changes))
            console(f"resuming from step {int(state.step)} with changed settings: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        eval_step = setup.eval_step()

        def run_eval(step: int, params: Any) -> dict[str, float]:
            eval_batches = pipeline.eval_batches(config.data, tokenizer, setup.batch_sharding,
                                                 objective=config.train.objective)
            record = evaluate(eval_step, params, eval_batches, config.eval.steps)
            record.update(selection.task_eval(setup, params, tokenizer))   # task metrics
            record = log.write(step, record, prefix="eval/")
            if log.active:   # every run ends with an eval, so curves.png is also its last state
                write_run_curves(workdir)
            return record

        try:
            state, last_eval = _train_steps(setup, state, batches, ckpt, reporter, run_eval,
                                            last, preempt, teacher)
            ckpt.wait()
        except BaseException:
            log.close()
            _close_quietly(ckpt)
            raise
        sample = None
        if preempt.requested:
            console(f"stopped by {_signal_name(preempt)}: checkpointed step {int(state.step)} "
                    f"{preempt.elapsed():.1f} s after the request; run the same command to "
                    "resume")
        elif last == config.train.steps:
            last_eval = last_eval or run_eval(int(state.step), state.params)
            sample = _sample(setup, state.params, tokenizer)
            if sample is not None:
                log.text(int(state.step), "sample", sample)
                console(f"\n--- sample after {int(state.step)} steps ---\n{sample}\n---")
        log.close()
    ckpt.close()
    preempted = int(state.step) if preempt.requested else None
    return {**(last_eval or {}), "sample": sample, "preempted": preempted}


def _signal_name(preempt: Preemption) -> str:
    return signal.Signals(preempt.signal).name if preempt.signal else "a preemption notice"


def _close_quietly(ckpt: Checkpointer) -> None:
    """Closes `ckpt` on the way out of a failed run without hiding why it failed."""
    try:
        ckpt.close()
    except Exception:   # noqa: BLE001 - the error already propagating is the one to report
        pass


def _initial_state(setup: Setup, ckpt: Checkpointer, batches: pipeline.GlobalBatches,
                   workdir: Path) -> tuple[state_lib.TrainState, dict[str, list[Any]]]:
    """The latest readable checkpoint (with the data iterator moved to where it was) and the
    safe config changes since, else a new state (fresh, or from a fine-tuning backbone)."""
    abstract = state_lib.abstract(setup.model, setup.model_cfg, setup.tx, setup.state_shardings)

    def restore(step: int):
        changes = resume.config_changes(ckpt.restore_config(step), setup.config,
                                        str(ckpt.path / str(step)))
        return ckpt.restore_state(step, abstract, batches), changes

    restored = resume.latest_readable(ckpt, restore)
    if restored is not None:
        return restored
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(setup.config.to_json_best_effort(indent=2))
    return finetune_backbone.initial_state(setup, workdir), {}


def _train_steps(setup: Setup, state: state_lib.TrainState, batches: pipeline.GlobalBatches,
                 ckpt: Checkpointer, reporter: "Reporter", run_eval, last: int,
                 preempt: Preemption, teacher=None):
    """Steps from the state's step to `last`, with periodic eval and checkpoints; a stop
    request checkpoints the step in flight and ends early. `teacher`: a distillation teacher
    (train/distill/teacher.py), whose soft targets the train step adds to the loss."""
    config = setup.config
    train_step = setup.train_step(teacher)
    watch = NonFiniteWatch(config.train.get("nonfinite", "halt"), ckpt)
    reporter.watch = watch
    last_eval, first, saved = None, int(state.step), None
    stopping = selection.EarlyStopping(config.finetune.patience,
                                       ckpt.restore_loop(first) if first else None)
    for step in range(first + 1, last + 1):
        batch = next(batches, None)
        if batch is None:   # data.num_epochs passes are done: end here, as if step-1 were last
            console(f"data: the {config.data.num_epochs} epoch(s) of training data ended after "
                    f"step {step - 1}; stopping")
            if first < step - 1 != saved:
                reporter.flush(force=True)
                watch.check(step - 1)
                last_eval = run_eval(step - 1, state.params)
                stopping.stop(selection.selection_value(config, last_eval))
                ckpt.save(step - 1, state, config=config.to_dict(), data_iterator=batches,
                          eval_loss=selection.selection_value(config, last_eval),
                          loop=stopping.state())
            break
        with jax.transfer_guard("disallow"):
            state, metrics = train_step(state, batch)
        reporter.dispatched(step, {**metrics, "epoch": batches.epoch})   # logs step - 1
        watch.dispatched(step, metrics)
        final = step in (last, config.train.steps)
        if preempt.stop_now(step):
            reporter.flush(force=True)
            watch.check(step)
            if saved != step:
                ckpt.save(step, state, config=config.to_dict(), data_iterator=batches,
                          loop=stopping.state())
            break
        eval_due = final or (config.eval.every and step % config.eval.every == 0)
        ckpt_due = final or (config.ckpt.every and step % config.ckpt.every == 0)
        if eval_due or ckpt_due:
            reporter.flush(force=final)
            watch.check(step)
            last_eval = run_eval(step, state.params) if eval_due else None
            stop = eval_due and stopping.stop(selection.selection_value(config, last_eval))
            if ckpt_due or stop:
                ckpt.save(step, state, config=config.to_dict(), data_iterator=batches,
                          eval_loss=selection.selection_value(config, last_eval),
                          loop=stopping.state())
                saved = step
            reporter.restart_clock(step)
            if stop:
                console(f"finetune: {selection.metric_name(config)} did not improve in "
                        f"{config.finetune.patience} evaluations; stopping after step {step}")
                break
    reporter.flush(force=True)
    watch.check(int(state.step))
    return state, last_eval


@jax.jit
def _track(first_bad: jax.Array, skipped: jax.Array, nonfinite: jax.Array, step: jax.Array):
    first_bad = jnp.where((first_bad < 0) & (nonfinite > 0), step, first_bad)
    return first_bad, skipped + nonfinite


class NonFiniteWatch:
    """Keeps, on the device, the first step whose loss or gradient norm was NaN/Inf and how
    many steps were skipped, so that no step waits for the host; `check` (at each log, eval
    and checkpoint) reads them. With train.nonfinite=halt a bad step stops the run there,
    before a checkpoint or an eval of the bad state; with skip it is only counted (the step
    itself left the state unchanged)."""

    def __init__(self, mode: str, ckpt: Checkpointer):
        self.mode, self.ckpt = mode, ckpt
        self.first_bad = jnp.full((), -1, jnp.int32)
        self.skipped = jnp.zeros((), jnp.int32)

    def dispatched(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.first_bad, self.skipped = _track(self.first_bad, self.skipped,
                                              metrics["nonfinite"], step)

    def check(self, step: int) -> None:
        if self.mode != "halt":
            return
        bad = int(self.first_bad)
        if bad < 0:
            return
        self.ckpt.wait()
        good = self.ckpt.latest_step()
        last = (f"the last good checkpoint is step {good} ({self.ckpt.path / str(good)})"
                if good is not None else "no checkpoint was written before it")
        raise TrainingDiverged(f"the loss or gradient norm became NaN/Inf at step {bad}; halted "
                               f"at step {step} without checkpointing it: {last}. Lower opt.lr "
                               "(or raise opt.warmup_steps), or set train.nonfinite=skip to skip "
                               "such steps")

    def record(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped} if self.mode == "skip" else {}


class Reporter:
    """Logs step metrics one step late, so the host never waits on the device it just fed.

    Throughput covers the steps since the last report; intervals holding compilation, eval or
    checkpointing are left out.
    """

    def __init__(self, log: MetricsLog, setup: Setup, n_params: int, every: int):
        config = setup.config
        self.log, self.every = log, every
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        # encoder-decoders: decoder parameters work on the rows' decoder length (data.target_len)
        self.flops = families.flops_per_token(
            setup.model_cfg, n_params, config.data.seq_len,
            data_config.target_length(config.data, config.train.objective) or None)
        self.peak = peak_tflops(config.train.peak_tflops)
        self.pending: tuple[int, Any] | None = None
        self.watch: NonFiniteWatch | None = None
        self.clock: tuple[float, int] | None = None   # None until the step has compiled

    def dispatched(self, step: int, metrics: Any) -> None:
        """Called right after step `step` was dispatched: reports the step before it."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self, force: bool = False) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        if step % self.every and not force:
            return
        extra = self.watch.record() if self.watch is not None else {}
        record = dict(jax.device_get({**metrics, **extra}))
        now = time.perf_counter()
        if self.clock is not None and step > self.clock[1]:
            record.update(throughput((now - self.clock[0]) / (step - self.clock[1]),
                                     self.tokens_per_step, self.flops, self.peak))
        self.log.write(step, record)
        self.log.advance(step, float(record["loss"]))
        if self.watch is not None:
            self.watch.check(step)
        self.clock = (now, step)

    def restart_clock(self, step: int) -> None:
        self.clock = (time.perf_counter(), step)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl`; a last line without its newline (being written
    now, or cut short by a killed run) is left out."""
    text = (Path(workdir) / "metrics.jsonl").read_text()
    lines = text.split("\n")[:-1]   # the piece after the last newline is not a whole record
    return [json.loads(line) for line in lines if line.strip()]
