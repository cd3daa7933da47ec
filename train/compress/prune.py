"""python -m train.compress prune --workdir RUN [--step latest|best|N] --out RUN_P
    --sparsity 0.5 [--pattern unstructured|2:4|N:M] [--scope layer|global]

One-shot magnitude pruning of the blocks' attention and MLP kernels (train/pruning.py) into a
new run that train.eval, train.generate and train.export read and that trains on with its
masks kept: python -m train --config RUN_P/config.py --workdir RUN_P.
"""
from __future__ import annotations

import argparse


def add_parser(commands) -> argparse.ArgumentParser:
    sub = commands.add_parser("prune", help="one-shot magnitude pruning (unstructured or N:M)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--sparsity", type=float, help="fraction of the kernels' weights pruned, "
                     "in [0, 1); N:M patterns: 1 - N/M (the default for them)")
    sub.add_argument("--pattern", default="unstructured",
                     help="unstructured | N:M (N kept of every M along the input dimension)")
    sub.add_argument("--scope", default="layer", choices=("layer", "global"),
                     help="unstructured: the same sparsity in each kernel of each layer, or one "
                     "threshold over all of them")
    sub.set_defaults(run=run)
    return sub


def run(args: argparse.Namespace) -> None:
    from train.compress.oneshot import prune_run   # deferred: --help stays fast
    report = prune_run(args.workdir, args.out, step=args.step, sparsity=args.sparsity,
                       pattern=args.pattern, scope=args.scope)
    for name, value in report.items():
        print(f"{name:60s} {value:.4f}")
    print(f"pruned run written to {args.out} (per-layer sparsity in {args.out}/prune.json)")
