"""python -m train.generate: text from a trained run (greedy, sampling or beam search).

    python -m train.generate --workdir runs/quickstart --prompt "def " --strategy sample \
        --temperature 0.8 --top-p 0.95 --max-new-tokens 64

A decoder continues each prompt; an encoder-decoder writes an output for it (shown after an
arrow). Decoding runs in one jitted loop over a KV cache (train/decoding/); prompts longer than
the context window slide.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from configs.loader import parse_run
from errors import fail_cleanly
from train import distributed
from train.decoding.options import Options

DEFAULTS = Options()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch of prompts")
    parser.add_argument("--strategy", default=DEFAULTS.strategy, help="greedy | sample | beam")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                        help="sample: softmax temperature")
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                        help="sample: only the k most likely tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="sample: only the "
                        "smallest set of tokens with probability >= p; 1 = off")
    parser.add_argument("--beam-width", type=int, default=DEFAULTS.beam_width)
    parser.add_argument("--length-penalty", type=float, default=DEFAULTS.length_penalty,
                        help="beam: score = log p / length**penalty (0 favours short outputs)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--stop", action="append", default=[],
                        help="extra stop piece besides EOS, e.g. '\\n'; repeatable")
    parser.add_argument("--window", type=int, default=0, help="context window in tokens; longer "
                        "inputs slide (0 = model.max_len)")
    parser.add_argument("--keep", type=int, default=0, help="tokens kept when the window slides "
                        "(0 = half the window)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole sequence every step (slow; for comparison)")
    distributed.add_flags(parser)
    with fail_cleanly("--verbose" in argv):
        args, config_args = parse_run(parser, argv)
        distributed.initialize(args)
        options = Options(args.strategy, args.temperature, args.top_k, args.top_p,
                          args.beam_width, args.length_penalty)
        from train.decoding.generate import generate_run   # deferred: --help stays fast
        texts = generate_run(args.workdir, args.step, args.prompt, options=options,
                             config_args=config_args, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, stops=args.stop, window=args.window,
                             keep=args.keep, use_cache=not args.no_cache)
        for text in texts if distributed.main_process() else ():
            print(text, flush=True)
            if len(args.prompt) > 1:
                print("-" * 40)


if __name__ == "__main__":
    main()
