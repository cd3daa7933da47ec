"""python -m train --config configs/quickstart.py --workdir runs/quickstart [--config.KEY=VALUE ...]"""
from __future__ import annotations

import argparse
import sys

from configs.loader import parse
from errors import fail_cleanly
from train import distributed


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train (or resume) a Loom model. A second run with the same --workdir resumes "
                    "from its latest checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="run directory: checkpoints, tokenizer, metrics.jsonl, tensorboard/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_flags(parser)
    with fail_cleanly("--verbose" in argv):
        args, config = parse(parser, argv)
        distributed.initialize(args)
        from train.loop import train   # deferred: --help stays fast
        train(config, args.workdir, progress=not args.no_progress)


if __name__ == "__main__":
    main()
