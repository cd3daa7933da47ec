"""python -m train.benchmark [--config configs/bench_tiny.py] [--steps N] [--dtypes float32,bfloat16]
    [--reference ../shared/bench/reference_gpt.py] [--nanodo PATH_TO_NANODO_CHECKOUT] [--rounds 3]
python -m train.benchmark --generate [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 128]
python -m train.benchmark --memory      (default config: configs/gpt_125m.py at batch 8, seq 128)
python -m train.benchmark --compile     (default: configs/bench_tiny.py at 12/24/48 layers)
python -m train.benchmark --loop [--loop-steps 125] [--ckpt-every 25]  (configs/quickstart.py)

Times Loom's compiled train step on synthetic batches of `train.objective` (no data pipeline,
no tokenizer), for every model family, and prints
one JSON line per measurement: params, step time, tokens/s, model TFLOP/s, MFU against the device
peak, compile time, peak device memory, and XLA's FLOP / byte / fusion counts of the step (which
do not depend on how busy the machine is). FLOPs count like ../shared/bench/reference_gpt.py
(6N + 12*L*d*T per token), so the two print comparable figures side by side.

--dtypes runs everything once per compute dtype (model.dtype). --reference and --nanodo time the
independent reference GPT and nanodo's own train step (a checkout of google-deepmind/nanodo) on
the same shape and dtype, alternating rounds with Loom, and print the median ratios.

With --sequence-memory it compiles (runs nothing) the train step at each of --seq-lens with the
length on one device or split over --sequence-sizes devices (mesh.sequence), and prints the
per-device temp/argument/output memory from XLA's memory_analysis (train/sequence_memory.py):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m train.benchmark \
        --config configs/bench_tiny.py --sequence-memory [--seq-lens 8192,32768] \
        [--sequence-sizes 1,4]

With --generate it times greedy decoding instead (random weights and prompt tokens, no stop
token): time to first token (prefill + the first token) and decode tokens/s after it, for each
batch size, with the KV cache and by recomputing the whole sequence every step.

--memory: per-device bytes of params, optimizer state and the step's temporaries on meshes
fsdp=1/2/4/8 and tensor=2/4 (8 fake CPU devices, nothing allocated). --compile: compile seconds
at 12/24/48 layers, scanned and unrolled. --loop: the real training loop's tokens/s (pipeline,
metrics, async checkpoints) against the bare step on the same batches.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from configs.loader import parse
from errors import fail_cleanly

DEFAULT_CONFIGS = {"memory": ("configs/gpt_125m.py", "--config.data.batch_size=8",
                              "--config.data.seq_len=128"),
                   "loop": ("configs/quickstart.py",)}
DEFAULT_CONFIG = ("configs/bench_tiny.py",)


def _with_default_config(argv: list[str]) -> list[str]:
    """argv with the mode's default --config (and its overrides, before the user's) if none."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    mode = next((m for m in DEFAULT_CONFIGS if f"--{m}" in argv), None)
    path, *overrides = DEFAULT_CONFIGS.get(mode, DEFAULT_CONFIG)
    return ["--config", path, *overrides, *argv]


def _fake_cpu_devices(n: int) -> None:
    """--memory measures shards on n fake CPU devices; only possible before jax starts."""
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={n}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = _with_default_config(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    parser.add_argument("--dtypes", help="comma-separated compute dtypes to run in turn, e.g. "
                                         "float32,bfloat16 (default: the config's model.dtype)")
    parser.add_argument("--reference", metavar="PATH",
                        help="also time this reference_gpt.py, alternating with Loom")
    parser.add_argument("--nanodo", metavar="PATH",
                        help="also time nanodo's train step from this checkout of "
                             "google-deepmind/nanodo, alternating with Loom")
    parser.add_argument("--reference-preset", default="tiny",
                        help="the reference preset of the same shape as --config")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations with --reference/--nanodo; loop runs with --loop")
    parser.add_argument("--generate", action="store_true",
                        help="time decoding (KV cache vs recomputation) instead of training")
    parser.add_argument("--batch-sizes", default="1,8", help="--generate: comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128, help="--generate: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="--generate: new tokens")
    parser.add_argument("--repeats", type=int, default=3, help="--generate: timed runs each")
    parser.add_argument("--memory", action="store_true",
                        help="per-device memory of the step on fsdp=1/2/4/8, tensor=2/4 meshes")
    parser.add_argument("--compile", action="store_true",
                        help="compile time at --depths layers, scan_layers on and off")
    parser.add_argument("--depths", default="12,24,48", help="--compile: comma-separated")
    parser.add_argument("--loop", action="store_true",
                        help="the training loop's tokens/s against the bare step")
    parser.add_argument("--loop-steps", type=int, default=125, help="--loop: steps per run")
    parser.add_argument("--ckpt-every", type=int, default=25, help="--loop: ckpt.every")
    parser.add_argument("--log-every", type=int, default=25, help="--loop: train.log_every")
    # sequence-parallel memory (train/sequence_memory.py)
    parser.add_argument("--sequence-memory", action="store_true",
                        help="per-device memory of the compiled train step (memory_analysis) "
                             "for each length and mesh.sequence size; compiles, runs nothing")
    parser.add_argument("--seq-lens", default="8192,32768", help="--sequence-memory: lengths")
    parser.add_argument("--sequence-sizes", default="1,4",
                        help="--sequence-memory: mesh.sequence sizes")
    with fail_cleanly("--verbose" in argv):
        args, config = parse(parser, argv)
        if args.memory or args.sequence_memory:
            _fake_cpu_devices(8)
        from train import measure   # deferred: --help stays fast
        from train.perf import compile_time, loop_overhead, memory
        for dtype in (args.dtypes.split(",") if args.dtypes else [config.model.dtype]):
            cfg = measure.with_dtype(config, dtype)
            if args.sequence_memory:
                from train import sequence_memory   # deferred: --help stays fast
                sequence_memory.measure(cfg, [int(n) for n in args.seq_lens.split(",")],
                                        [int(n) for n in args.sequence_sizes.split(",")])
            elif args.memory:
                memory.report(cfg)
            elif args.compile:
                compile_time.report(cfg, [int(d) for d in args.depths.split(",")])
            elif args.loop:
                loop_overhead.report(cfg, args.loop_steps, args.ckpt_every, args.log_every,
                                     args.rounds)
            elif args.generate:
                measure.measure_generate(cfg, [int(b) for b in args.batch_sizes.split(",")],
                                         args.prompt_len, args.new_tokens, args.repeats)
            elif args.reference or args.nanodo:
                measure.compare(cfg, args.steps, args.reference, args.reference_preset,
                                args.rounds, args.nanodo)
            else:
                measure.measure(cfg, args.steps)


if __name__ == "__main__":
    main()
