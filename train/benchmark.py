"""python -m train.benchmark --config configs/bench_tiny.py [--steps N] [--config.KEY=VALUE ...]
python -m train.benchmark --config configs/bench_tiny.py --reference ../shared/bench/reference_gpt.py
python -m train.benchmark --config configs/bench_tiny.py --generate [--batch-sizes 1,8]
    [--prompt-len 128] [--new-tokens 128] [--repeats 3]

Times Loom's compiled train step on synthetic batches of `train.objective` (no data pipeline,
no tokenizer), for every model family, and prints
one JSON line per measurement: params, step time, tokens/s, model TFLOP/s, MFU against the device
peak, compile time and peak device memory. FLOPs count like ../shared/bench/reference_gpt.py
(6N + 12*L*d*T per token), so the two print comparable figures side by side.

With --sequence-memory it compiles (runs nothing) the train step at each of --seq-lens with the
length on one device or split over --sequence-sizes devices (mesh.sequence), and prints the
per-device temp/argument/output memory from XLA's memory_analysis (train/sequence_memory.py):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m train.benchmark \
        --config configs/bench_tiny.py --sequence-memory [--seq-lens 8192,32768] \
        [--sequence-sizes 1,4]

With --generate it times greedy decoding instead (random weights and prompt tokens, no stop
token): time to first token (prefill + the first token) and decode tokens/s after it, for each
batch size, with the KV cache and by recomputing the whole sequence every step.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from configs.loader import parse
from errors import fail_cleanly


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    parser.add_argument("--reference", metavar="PATH",
                        help="also time this reference_gpt.py, alternating with Loom")
    parser.add_argument("--reference-preset", default="tiny",
                        help="the reference preset of the same shape as --config")
    parser.add_argument("--rounds", type=int, default=3, help="alternations with --reference")
    parser.add_argument("--generate", action="store_true",
                        help="time decoding (KV cache vs recomputation) instead of training")
    parser.add_argument("--batch-sizes", default="1,8", help="--generate: comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128, help="--generate: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="--generate: new tokens")
    parser.add_argument("--repeats", type=int, default=3, help="--generate: timed runs each")
    # sequence-parallel memory (train/sequence_memory.py)
    parser.add_argument("--sequence-memory", action="store_true",
                        help="per-device memory of the compiled train step (memory_analysis) "
                             "for each length and mesh.sequence size; compiles, runs nothing")
    parser.add_argument("--seq-lens", default="8192,32768", help="--sequence-memory: lengths")
    parser.add_argument("--sequence-sizes", default="1,4",
                        help="--sequence-memory: mesh.sequence sizes")
    with fail_cleanly("--verbose" in argv):
        args, config = parse(parser, argv)
        from train import measure   # deferred: --help stays fast
        if args.sequence_memory:
            from train import sequence_memory   # deferred: --help stays fast
            sequence_memory.measure(config, [int(n) for n in args.seq_lens.split(",")],
                                    [int(n) for n in args.sequence_sizes.split(",")])
        elif args.generate:
            measure.measure_generate(config, [int(b) for b in args.batch_sizes.split(",")],
                                     args.prompt_len, args.new_tokens, args.repeats)
        elif args.reference:
            measure.compare(config, args.steps, args.reference, args.reference_preset,
                            args.rounds)
        else:
            measure.measure(config, args.steps)


if __name__ == "__main__":
    main()
