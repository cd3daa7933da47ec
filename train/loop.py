"""The training loop: build everything from the config, resume if a checkpoint exists, train,
evaluate, checkpoint, and end with a text sample."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from data import pipeline
from data.tokenizer import Tokenizer
from errors import CheckpointError
from model.sharding import activate
from train import families, state as state_lib
from train.checkpoint import Checkpointer
from train.config import validate
from train.decoding import generate
from train.decoding.options import Options
from train.evaluation.evaluate import evaluate
from train.finetune import backbone as finetune_backbone, selection
from train.metrics import MetricsLog, console, peak_tflops, throughput
from train.setup import Setup, build, with_vocab


def _check_resumable(saved: dict[str, Any], config: ConfigDict, path: Path) -> None:
    saved_model = saved.get("model", {})
    diff = {k: (saved_model.get(k), v) for k, v in config.model.items() if saved_model.get(k) != v}
    if diff:
        changes = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path} was trained with a different model ({changes}); use a new "
                              "--workdir or restore the original model settings")
    saved_vocab = saved.get("data", {}).get("tokenizer", {}).get("fingerprint", "")
    if saved_vocab and saved_vocab != config.data.tokenizer.fingerprint:
        raise CheckpointError(f"{path} was trained with tokenizer {saved_vocab}, but this run's "
                              f"is {config.data.tokenizer.fingerprint}; restore the run's "
                              "original tokenizer.model, or use a new --workdir")


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
    continues exactly where it stopped.
    """
    validate(config)
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    config = finetune_backbone.resolve(config, workdir)   # fine-tuning: backbone, labels
    tokenizer = pipeline.load_or_train_tokenizer(config.data, workdir)
    config = with_vocab(config, tokenizer)
    setup = build(config)
    ckpt = Checkpointer(workdir, config.ckpt)
    last = min(stop_after or config.train.steps, config.train.steps)
    with activate(setup.mesh, setup.rules):
        batches = pipeline.train_batches(config.data, tokenizer, setup.batch_sharding,
                                         objective=config.train.objective)
        state = _initial_state(setup, ckpt, batches, workdir)
        log = MetricsLog(workdir, config.train.steps, int(state.step), progress=progress)
        n_params = state_lib.param_count(state.params)
        reporter = Reporter(log, setup, n_params, config.train.log_every)
        if int(state.step) == 0:
            log.write(0, {"params": n_params, "flops_per_token": reporter.flops})
        eval_step = setup.eval_step()

        def run_eval(step: int, params: Any) -> dict[str, float]:
            eval_batches = pipeline.eval_batches(config.data, tokenizer, setup.batch_sharding,
                                                 objective=config.train.objective)
            record = evaluate(eval_step, params, eval_batches, config.eval.steps)
            record.update(selection.task_eval(setup, params, tokenizer))   # task metrics
            return log.write(step, record, prefix="eval/")

        state, last_eval = _train_steps(setup, state, batches, ckpt, reporter, run_eval, last)
        ckpt.wait()
        sample = None
        if last == config.train.steps:
            last_eval = last_eval or run_eval(int(state.step), state.params)
            sample = _sample(setup, state.params, tokenizer)
            if sample is not None:
                log.text(int(state.step), "sample", sample)
                console(f"\n--- sample after {int(state.step)} steps ---\n{sample}\n---")
        log.close()
    ckpt.close()
    return {**(last_eval or {}), "sample": sample}


def _initial_state(setup: Setup, ckpt: Checkpointer, batches: pipeline.GlobalBatches,
                   workdir: Path) -> state_lib.TrainState:
    """The latest checkpoint (with the data iterator moved to where it was), else a new state."""
    step = ckpt.latest_step()
    if step is None:
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(setup.config.to_json_best_effort(indent=2))
        return finetune_backbone.initial_state(setup, workdir)   # fresh, or from a backbone
    _check_resumable(ckpt.restore_config(step), setup.config, ckpt.path / str(step))
    abstract = state_lib.abstract(setup.model, setup.model_cfg, setup.tx, setup.state_shardings)
    return ckpt.restore_state(step, abstract, batches)


def _train_steps(setup: Setup, state: state_lib.TrainState, batches: pipeline.GlobalBatches,
                 ckpt: Checkpointer, reporter: "Reporter", run_eval, last: int):
    """Steps from the state's step to `last`, with periodic eval and checkpoints."""
    config = setup.config
    train_step = setup.train_step()
    last_eval, first, saved = None, int(state.step), None
    stopping = selection.EarlyStopping(config.finetune.patience)
    for step in range(first + 1, last + 1):
        batch = next(batches, None)
        if batch is None:   # data.num_epochs passes are done: end here, as if step-1 were last
            console(f"data: the {config.data.num_epochs} epoch(s) of training data ended after "
                    f"step {step - 1}; stopping")
            if first < step - 1 != saved:
                reporter.flush(force=True)
                last_eval = run_eval(step - 1, state.params)
                ckpt.save(step - 1, state, config=config.to_dict(), data_iterator=batches,
                          eval_loss=selection.selection_value(config, last_eval))
            break
        with jax.transfer_guard("disallow"):
            state, metrics = train_step(state, batch)
        reporter.dispatched(step, {**metrics, "epoch": batches.epoch})
        final = step in (last, config.train.steps)
        eval_due = final or (config.eval.every and step % config.eval.every == 0)
        ckpt_due = final or (config.ckpt.every and step % config.ckpt.every == 0)
        if eval_due or ckpt_due:
            reporter.flush(force=final)
            last_eval = run_eval(step, state.params) if eval_due else None
            if ckpt_due:
                ckpt.save(step, state, config=config.to_dict(),
                          data_iterator=batches,
                          eval_loss=selection.selection_value(config, last_eval))
                saved = step
            reporter.restart_clock(step)
            if eval_due and stopping.stop(selection.selection_value(config, last_eval)):
                console(f"finetune: {selection.metric_name(config)} did not improve in "
                        f"{config.finetune.patience} evaluations; stopping after step {step}")
                if saved != step:
                    ckpt.save(step, state, config=config.to_dict(), data_iterator=batches,
                              eval_loss=selection.selection_value(config, last_eval))
                break
    reporter.flush(force=True)
    return state, last_eval


class Reporter:
    """Logs step metrics one step late, so the host never waits on the device it just fed.

    Throughput covers the steps since the last report; intervals holding compilation, eval or
    checkpointing are left out.
    """

    def __init__(self, log: MetricsLog, setup: Setup, n_params: int, every: int):
        config = setup.config
        self.log, self.every = log, every
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        self.flops = families.flops_per_token(setup.model_cfg, n_params, config.data.seq_len)
        self.peak = peak_tflops(config.train.peak_tflops)
        self.pending: tuple[int, Any] | None = None
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
        record = dict(jax.device_get(metrics))
        now = time.perf_counter()
        if self.clock is not None and step > self.clock[1]:
            record.update(throughput((now - self.clock[0]) / (step - self.clock[1]),
                                     self.tokens_per_step, self.flops, self.peak))
        self.log.write(step, record)
        self.log.advance(step, float(record["loss"]))
        self.clock = (now, step)

    def restart_clock(self, step: int) -> None:
        self.clock = (time.perf_counter(), step)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl`."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
