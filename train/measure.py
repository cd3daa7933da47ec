"""Speed measurements behind `python -m train.benchmark` (train/benchmark.py).

`measure` times Loom's compiled train step on synthetic batches of `train.objective`
(train/families.py `synthetic_batch`: no data pipeline, no tokenizer), for every model family:
params, step time, tokens/s, model TFLOP/s, MFU against the device peak, compile time and peak
device memory, one JSON line each. FLOPs count like ../shared/bench/reference_gpt.py (6N +
12*L*d*T per token), so `compare` prints comparable figures side by side.

`measure_generate` times greedy decoding (random weights and prompt tokens, no stop token):
time to first token (prefill + the first token) and decode tokens/s after it, for each batch
size, with the KV cache and by recomputing the whole sequence every step.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from errors import ConfigError
from model.sharding import activate
from train import families, state as state_lib
from train.config import validate
from train.decoding.generate import decode, stepper_for
from train.decoding.options import Options
from train.metrics import peak_tflops, throughput
from train.perf import hlo
from train.setup import build


def peak_memory_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 3) if peak else None


def with_dtype(config: ConfigDict, dtype: str) -> ConfigDict:
    """A copy of `config` computing in `dtype` (model.dtype)."""
    config = ConfigDict(config.to_dict())
    config.model.dtype = dtype.strip()
    return config


def measure(config: ConfigDict, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Compiles and times `steps` train steps of `config` after `warmup` untimed ones."""
    if not config.model.vocab_size:    # no tokenizer here: the size it would have
        config.model.vocab_size = config.data.tokenizer.vocab_size
    validate(config)
    setup = build(config)
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings,
                               config.train.seed)
        batch = families.synthetic_batch(config, setup.batch_sharding)
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
    flops = families.flops_per_token(setup.model_cfg, n_params, config.data.seq_len,
                                     families.decoder_length(config))
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
               loss=round(float(metrics["loss"]), 4), **hlo.stats(step))
    print(json.dumps(out), flush=True)
    return out


# reference_gpt.py's shapes (name: vocab, d_model, heads, layers, d_ff, seq_len, batch), for
# comparing with nanodo alone
REFERENCE_PRESETS = {"tiny": (8192, 256, 4, 4, 704, 256, 8)}


def _load_reference(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"--reference {path}: no such file (the independent reference GPT is "
                          "shared/bench/reference_gpt.py)")
    spec = importlib.util.spec_from_file_location("reference_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(config: ConfigDict, steps: int, reference_path: str | None, preset: str,
            rounds: int, nanodo_path: str | None = None) -> dict[str, Any]:
    """Alternates Loom, the reference GPT and/or nanodo's train step `rounds` times in this
    process (so all see the same machine state), at Loom's compute dtype, and prints a summary
    line with the median tokens/s of each and Loom's ratio to each."""
    ref = _load_reference(reference_path) if reference_path else None
    peers = {}
    if nanodo_path:
        from train.perf import nanodo   # deferred: loads a checkout only when asked
        peers["nanodo"] = nanodo.load(nanodo_path)
    presets = ref.PRESETS if ref else REFERENCE_PRESETS
    if preset not in presets:
        raise ConfigError(f"--reference-preset {preset!r}: the reference knows {list(presets)}")
    vocab, d, h, layers, ff, seq, batch = presets[preset]
    m = config.model
    ours = (m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, config.data.seq_len,
            config.data.batch_size)
    if ours != (vocab, d, h, layers, ff, seq, batch):
        raise ConfigError(f"config shape {ours} differs from the reference preset {preset!r} "
                          f"{presets[preset]} (vocab, d, heads, layers, ff, seq, batch)")
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    peak = peak_tflops(config.train.peak_tflops)
    dtype = config.model.dtype
    runs: dict[str, list[float]] = {"loom": []}
    for _ in range(rounds):
        runs["loom"].append(measure(ConfigDict(config.to_dict()), steps)["tok_per_s"])
        if ref:
            runs.setdefault("reference", []).append(
                ref.measure(preset, impl, False, steps, batch, peak, dtype=dtype)["tok_per_s"])
        if "nanodo" in peers:
            runs.setdefault("nanodo", []).append(nanodo.measure(
                peers["nanodo"], presets[preset], dtype, steps)["tok_per_s"])
    medians = {k: statistics.median(v) for k, v in runs.items()}
    summary = dict(summary=preset, dtype=dtype, rounds=rounds, steps=steps,
                   **{f"{k}_tok_per_s": v for k, v in medians.items()},
                   **{f"ratio_{k}": round(medians["loom"] / v, 3)
                      for k, v in medians.items() if k != "loom"})
    print(json.dumps(summary), flush=True)
    return summary


def measure_generate(config: ConfigDict, batch_sizes: Sequence[int], prompt_len: int,
                     new_tokens: int, repeats: int = 3) -> list[dict[str, Any]]:
    """Greedy decoding speed of `config`'s model, with and without the KV cache.

    Time to first token is the wall time of a 1-token generation; decode tokens/s is
    batch * (new_tokens - 1) over the extra time of a `new_tokens` generation. Each figure is
    the median of `repeats` timed runs after a compiling one; `spread` is (max - min) / median
    of the full runs, a measure of the noise.
    """
    if not config.model.vocab_size:    # no tokenizer here: the size it would have
        config.model.vocab_size = config.data.tokenizer.vocab_size
    validate(config)
    if prompt_len + new_tokens > config.model.max_len:
        raise ConfigError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceed "
                          f"model.max_len={config.model.max_len}; the benchmark decodes without "
                          "sliding the context window")
    setup = build(config)
    cfg = setup.model_cfg
    results = []
    with activate(setup.mesh, setup.rules):
        params = state_lib.init(setup.model, cfg, setup.tx, setup.state_shardings,
                                config.train.seed).params

        def timed(stepper, prompt, n):
            """Compile seconds, then the `repeats` run times, of an n-token generation."""
            run = lambda: decode(stepper, params, prompt, Options(), max_new_tokens=n,  # noqa
                                 rng=jax.random.PRNGKey(0), vocab_limit=cfg.vocab_size,
                                 stop_ids=())
            t0 = time.perf_counter()
            run()
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            return compile_s, sorted(times)

        for batch in batch_sizes:
            tokens = jax.random.randint(jax.random.PRNGKey(batch), (batch, prompt_len), 4,
                                        cfg.vocab_size, jnp.int32)
            prompt = {"tokens": tokens, "segments": jnp.ones_like(tokens)}
            for use_cache in (True, False):
                stepper = stepper_for(cfg, use_cache=use_cache)
                compile_1, first = timed(stepper, prompt, 1)
                compile_n, full = timed(stepper, prompt, new_tokens)
                ttft, total = first[len(first) // 2], full[len(full) // 2]
                decode_s = max(total - ttft, 1e-9)
                out = dict(system="loom", mode="generate", device=jax.devices()[0].device_kind,
                           n_devices=jax.device_count(), params_M=round(
                               state_lib.param_count(params) / 1e6, 1), dtype=cfg.dtype,
                           batch=batch, prompt=prompt_len, new_tokens=new_tokens,
                           kv_cache=use_cache, ttft_s=round(ttft, 4),
                           decode_tok_per_s=round(batch * (new_tokens - 1) / decode_s, 1),
                           ms_per_step=round(1e3 * decode_s / (new_tokens - 1), 2),
                           total_s=round(total, 3), spread=round((full[-1] - full[0]) / total, 3),
                           compile_s=round(compile_1 + compile_n - ttft - total, 1))
                print(json.dumps(out), flush=True)
                results.append(out)
    return results
