"""python -m train.compress drop-layers --workdir RUN [--step latest|best|N] --keep 0,2,3
    --out RUN_D    (encoder_decoder: --keep-encoder 0,1 and/or --keep-decoder 0,2)

Writes the run with only the kept blocks (scanned or unrolled stacks; train/compress/
layer_drop.py) as a new run whose config has the new depth.
"""
from __future__ import annotations

import argparse


def add_parser(commands) -> argparse.ArgumentParser:
    sub = commands.add_parser("drop-layers", help="keep only some blocks of the layer stack",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--keep", help="blocks kept, in increasing order, e.g. 0,2,3 (the "
                     "decoder's, the encoder's, or ELECTRA's generator's and discriminator's)")
    sub.add_argument("--keep-encoder", help="encoder_decoder: encoder blocks kept (default all)")
    sub.add_argument("--keep-decoder", help="encoder_decoder: decoder blocks kept (default all)")
    sub.set_defaults(run=run)
    return sub


def run(args: argparse.Namespace) -> None:
    from train.compress.layer_drop import drop_layers, parse_keep   # deferred: fast --help
    lists = {name: None if getattr(args, name) is None else
             parse_keep(getattr(args, name), "--" + name.replace("_", "-"))
             for name in ("keep", "keep_encoder", "keep_decoder")}
    depth = drop_layers(args.workdir, args.out, step=args.step, **lists)
    print(f"run with {', '.join(f'model.{k}={v}' for k, v in depth.items())} written to "
          f"{args.out}")
