"""python -m train.plot: train and eval curves of one or more runs, as a PNG.

    python -m train.plot RUN [RUN ...] --out curves.png [--metric loss --metric eval/loss ...]
        [--smooth 0.6] [--x step|tokens]

Each --metric is a key of the runs' metrics.jsonl: `loss`, `accuracy`, `grad_norm`, `lr`,
`tokens_per_s`, ... for training records, `eval/loss`, `eval/perplexity`, `eval/accuracy` for
evaluations. A metric and its eval/ counterpart share a panel; each other metric gets its own.
`--x tokens` puts tokens read (step x data.batch_size x data.seq_len) on the x axis.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from configs.loader import add_verbose, configure_logging
from errors import fail_cleanly
from train import plots


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="workdir of a training run")
    parser.add_argument("--out", default=plots.CURVES_FILE, help="PNG file to write")
    parser.add_argument("--metric", action="append", dest="metrics",
                        help="metric to draw; repeatable (default: "
                             f"{' and '.join(plots.DEFAULT_METRICS)})")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="exponential smoothing of training curves, in [0, 1) (0 = raw)")
    parser.add_argument("--x", default="step", choices=plots.X_AXES, help="x axis")
    add_verbose(parser)
    with fail_cleanly("--verbose" in argv):
        args = parser.parse_args(argv)
        configure_logging()
        width, height = plots.plot_runs(args.runs, args.out,
                                        metrics=args.metrics or plots.DEFAULT_METRICS,
                                        smoothing=args.smooth, x=args.x)
        print(f"wrote {args.out} ({width}x{height} px, {len(args.runs)} run(s))")


if __name__ == "__main__":
    main()
