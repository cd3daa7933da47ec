"""python -m train.compress COMMAND --workdir RUN --out NEW_RUN [...]

Each command lives in its own module of this package, which adds its subparser and its own
flags in `add_parser(commands)` and sets `run=` (called with the parsed arguments) as its
default; --workdir, --step and --out, which every command takes, are added here.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from errors import fail_cleanly
from train import distributed

# command name -> module of train.compress that defines it (imported lazily: --help stays fast)
COMMANDS: dict[str, str] = {
    "prune": "prune", "drop-layers": "drop_layers",
    "quantize": "quantize",
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m train.compress",
        description="Compress a Loom run into a new run directory.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        sub = importlib.import_module(f"train.compress.{module}").add_parser(commands)
        sub.add_argument("--workdir", required=True, help="directory of the training run")
        sub.add_argument("--step", default="latest", help="its checkpoint: latest, best or a "
                         "step number")
        sub.add_argument("--out", required=True, help="new run directory (absent or empty)")
        sub.add_argument("--verbose", action="store_true", help="tracebacks for errors")
        distributed.add_flags(sub)
    with fail_cleanly("--verbose" in argv):
        args = parser.parse_args(argv)
        distributed.initialize(args)
        args.run(args)


if __name__ == "__main__":
    main()
