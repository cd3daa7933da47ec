"""python -m train.benchmark --config configs/bench_tiny.py [--steps N] [--config.KEY=VALUE ...]
   python -m train.benchmark --config configs/bench_tiny.py --reference shared/bench/reference_gpt.py

Times Loom's compiled train step on synthetic batches of `train.objective` (train/synthetic.py:
no data pipeline, no tokenizer), for every model family, and prints
one JSON line per measurement: params, step time, tokens/s, model TFLOP/s, MFU against the device
peak, compile time and peak device memory. FLOPs count like ../shared/bench/reference_gpt.py
(6N + 12*L*d*T per token), so the two print comparable figures side by side.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
from ml_collections import ConfigDict

import model as model_lib
from model.sharding import activate
from train import state as state_lib
from train.cli import fail_cleanly, parse
from train.config import ConfigError, validate
from train.metrics import peak_tflops, throughput
from train.synthetic import decoder_length, synthetic_batch


def peak_memory_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 3) if peak else None


def measure(config: ConfigDict, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Compiles and times `steps` train steps of `config` after `warmup` untimed ones."""
    from train.loop import build  # deferred: keeps --help fast

    if not config.model.vocab_size:
        config.model.vocab_size = 32000
    validate(config)
    setup = build(config)
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings,
                               config.train.seed)
        batch = synthetic_batch(config, setup.batch_sharding)
        t0 = time.perf_counter()
        step = setup.train_step().lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        dt = (time.perf_counter() - t0) / steps
    n_params = state_lib.param_count(state.params)
    tokens = config.data.batch_size * config.data.seq_len
    flops = model_lib.flops_per_token(setup.model_cfg, n_params, config.data.seq_len,
                                      decoder_length(config))
    peak = peak_tflops(config.train.peak_tflops)
    figures = throughput(dt, tokens, flops, peak)
    out = dict(system="loom", objective=config.train.objective,
               device=jax.devices()[0].device_kind, n_devices=jax.device_count(),
               batch=config.data.batch_size, seq=config.data.seq_len,
               params_M=round(n_params / 1e6, 1), dtype=config.model.dtype,
               remat=config.model.remat, step_s=round(dt, 4),
               tok_per_s=round(figures["tokens_per_s"]),
               model_tflops=round(figures["model_tflops"], 2), peak_tflops=peak,
               mfu=round(figures["mfu"], 3) if "mfu" in figures else None,
               compile_s=round(compile_s, 1), peak_mem_gb=peak_memory_gb(),
               loss=round(float(metrics["loss"]), 4))
    print(json.dumps(out), flush=True)
    return out


def _load_reference(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"--reference {path}: no such file (the independent reference GPT is "
                          "shared/bench/reference_gpt.py)")
    spec = importlib.util.spec_from_file_location("reference_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(config: ConfigDict, steps: int, reference_path: str, preset: str,
            rounds: int) -> dict[str, Any]:
    """Alternates Loom and the reference GPT `rounds` times in this process (so both see the
    same machine state) and prints a summary line with median tokens/s and their ratio."""
    ref = _load_reference(reference_path)
    if preset not in ref.PRESETS:
        raise ConfigError(f"--reference-preset {preset!r}: the reference knows {list(ref.PRESETS)}")
    vocab, d, h, layers, ff, seq, batch = ref.PRESETS[preset]
    m = config.model
    ours = (m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, config.data.seq_len,
            config.data.batch_size)
    if ours != (vocab, d, h, layers, ff, seq, batch):
        raise ConfigError(f"config shape {ours} differs from the reference preset {preset!r} "
                          f"{ref.PRESETS[preset]} (vocab, d, heads, layers, ff, seq, batch)")
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    peak = peak_tflops(config.train.peak_tflops)
    loom, reference = [], []
    for _ in range(rounds):
        loom.append(measure(ConfigDict(config.to_dict()), steps)["tok_per_s"])
        reference.append(ref.measure(preset, impl, False, steps, batch, peak)["tok_per_s"])
    summary = dict(summary=preset, rounds=rounds, loom_tok_per_s=statistics.median(loom),
                   reference_tok_per_s=statistics.median(reference),
                   ratio=round(statistics.median(loom) / statistics.median(reference), 3))
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    parser.add_argument("--reference", metavar="PATH",
                        help="also time this reference_gpt.py, alternating with Loom")
    parser.add_argument("--reference-preset", default="tiny",
                        help="the reference preset of the same shape as --config")
    parser.add_argument("--rounds", type=int, default=3, help="alternations with --reference")
    with fail_cleanly():
        args, config = parse(parser, argv)
        if args.reference:
            compare(config, args.steps, args.reference, args.reference_preset, args.rounds)
        else:
            measure(config, args.steps)


if __name__ == "__main__":
    main(sys.argv[1:])
