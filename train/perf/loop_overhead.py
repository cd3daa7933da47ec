"""The real training loop's tokens/s against the bare compiled step on the same batches.

The loop is `train.loop.train` unchanged: data pipeline, one-step-late metrics every
train.log_every steps, async checkpoints every ckpt.every steps (evaluation and the closing
sample are switched off: they are not per-step overhead). Its throughput is read from the wall
times TensorBoard stamps on the logged steps, from the first logged step (compilation is before
it) to the last (the final checkpoint is after it); the window holds the periodic checkpoints.
The bare step runs on the same batches, taken from the same pipeline, on a fresh state, just
before and just after each loop run (the machine's load changes between them; the round's bare
figure is their mean).

Wall time on a shared machine mostly measures the other processes. Next to it the report gives
the process's CPU seconds per step (`time.process_time`: every thread of the process — XLA's
compute threads, the pipeline, Orbax's writers, TensorBoard's), read at the same two logged
steps of the loop and around the bare steps. CPU work does not change with the machine's load,
so `cpu_ratio` (bare CPU per step / loop CPU per step) is the load-independent figure: the
fraction of the loop's work that is the step itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from data import pipeline
from errors import ConfigError
from model.sharding import activate
from train import state as state_lib
from train.setup import build, with_vocab


def logged_wall_times(workdir: Path, tag: str = "loss") -> dict[int, float]:
    """step -> wall time of the `tag` scalar in the run's TensorBoard event files."""
    from tensorboardX.proto import event_pb2   # the writer's own protobufs; no TensorFlow
    times = {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):   # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if any(v.tag == tag for v in event.summary.value):
                times[int(event.step)] = event.wall_time
    return times


def loop_config(config: ConfigDict, steps: int, ckpt_every: int, log_every: int) -> ConfigDict:
    config = ConfigDict(config.to_dict())
    config.train.update(steps=steps, log_every=log_every)
    config.eval.update(every=0, steps=1, sample_prompt="")
    config.ckpt.update(every=ckpt_every, async_save=True, keep=2, keep_best=0)
    return config


@contextlib.contextmanager
def _cpu_stamps(stamps: dict[int, float]):
    """While active, the loop's train-metric writes record the process CPU time at their step
    (the moment TensorBoard stamps their wall time)."""
    from train import loop   # deferred: the loop imports every subsystem

    class Stamped(loop.MetricsLog):
        def write(self, step, metrics, prefix=""):
            if not prefix:
                stamps[int(step)] = time.process_time()
            return super().write(step, metrics, prefix)

    original, loop.MetricsLog = loop.MetricsLog, Stamped
    try:
        yield
    finally:
        loop.MetricsLog = original


def _loop_tok_per_s(config: ConfigDict, workdir: Path, first: int,
                    last: int) -> tuple[float, float]:
    """(tokens/s, CPU seconds per step) of the real loop between logged steps first and last."""
    from train.loop import train   # deferred: the loop imports every subsystem
    cpu: dict[int, float] = {}
    with _cpu_stamps(cpu):
        train(config, workdir, progress=False)
    times = logged_wall_times(workdir)
    tokens = config.data.batch_size * config.data.seq_len * (last - first)
    return tokens / (times[last] - times[first]), (cpu[last] - cpu[first]) / (last - first)


def _bare_tok_per_s(config: ConfigDict, workdir: Path, first: int,
                    last: int) -> tuple[float, float]:
    """(tokens/s, CPU seconds per step) of the compiled step alone on batches first+1 .. last of
    the loop's own pipeline."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tokenizer = pipeline.load_or_train_tokenizer(config.data, workdir)
    config = with_vocab(config, tokenizer)
    setup = build(config)
    with activate(setup.mesh, setup.rules):
        batches = pipeline.train_batches(config.data, tokenizer, setup.batch_sharding,
                                         objective=config.train.objective)
        for _ in range(first):
            next(batches)
        timed = [next(batches) for _ in range(last - first)]
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings,
                               config.train.seed)
        step = setup.train_step().lower(state, timed[0]).compile()
        for batch in timed[:2]:
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in timed:
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return config.data.batch_size * config.data.seq_len * len(timed) / seconds, cpu / len(timed)


def report(config: ConfigDict, steps: int, ckpt_every: int, log_every: int,
           rounds: int = 2) -> dict[str, Any]:
    """Alternates `rounds` loop runs (each in a fresh workdir) with the bare step; prints one
    JSON line per round and a summary with the ratio of the medians."""
    if steps < 2 * log_every:
        raise ConfigError(f"--loop-steps {steps}: give at least two logged steps "
                          f"(2 x train.log_every = {2 * log_every})")
    config = loop_config(config, steps, ckpt_every, log_every)
    first, last = log_every, steps   # the first logged step and the last (always logged)
    loop, bare, loop_cpu, bare_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="loom-loop-") as tmp:
        for r in range(rounds):
            workdir = Path(tmp) / f"run{r}"
            run_cfg = ConfigDict(config.to_dict())
            if r:   # later rounds reuse the first round's vocabulary
                run_cfg.data.tokenizer.path = str(Path(tmp) / "run0" / "tokenizer.model")
            before = _bare_tok_per_s(run_cfg, workdir, first, last)   # leaves the vocabulary
            tok_per_s, cpu = _loop_tok_per_s(run_cfg, workdir, first, last)
            loop.append(tok_per_s)
            loop_cpu.append(cpu)
            after = _bare_tok_per_s(run_cfg, workdir, first, last)
            bare.append((before[0] + after[0]) / 2)
            bare_cpu.append((before[1] + after[1]) / 2)
            print(json.dumps(dict(report="loop", round=r, steps=steps, timed_steps=last - first,
                                  ckpt_every=ckpt_every, log_every=log_every,
                                  checkpoints_in_window=sum(
                                      s % ckpt_every == 0 for s in range(first, last)),
                                  loop_tok_per_s=round(loop[-1]), bare_tok_per_s=round(bare[-1]),
                                  ratio=round(loop[-1] / bare[-1], 3),
                                  loop_cpu_s_per_step=round(loop_cpu[-1], 4),
                                  bare_cpu_s_per_step=round(bare_cpu[-1], 4),
                                  cpu_ratio=round(bare_cpu[-1] / loop_cpu[-1], 3),
                                  load_average=round(os.getloadavg()[0], 2))), flush=True)
    summary = dict(summary="loop", rounds=rounds, loop_tok_per_s=round(statistics.median(loop)),
                   bare_tok_per_s=round(statistics.median(bare)),
                   ratio=round(statistics.median(loop) / statistics.median(bare), 3),
                   loop_cpu_s_per_step=round(statistics.median(loop_cpu), 4),
                   bare_cpu_s_per_step=round(statistics.median(bare_cpu), 4),
                   cpu_ratio=round(statistics.median(bare_cpu) / statistics.median(loop_cpu), 3))
    print(json.dumps(summary), flush=True)
    return summary
