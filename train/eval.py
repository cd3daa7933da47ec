"""python -m train.eval: evaluate a saved checkpoint on whatever devices are present.

    python -m train.eval --workdir runs/quickstart [--step latest|best|N] [--split NAME]
        [--steps N] [--choices FILE.jsonl ...] [--shots K [--demos FILE] [--shot-seed S]]
        [--predictions FILE.jsonl]
        [--config.data.KEY=VALUE ...]

`--split` names a split of the run's data, or of another corpus or tfds dataset chosen with
--config.data overrides (e.g. --config.data.source=tfds --config.data.tfds_name=lm1b --split
test); the run's own tokenizer is used. `--steps` batches (default eval.steps; 0 = one pass over
the split, leaving out a last partial batch). `--choices` scores multiple-choice items (see
train/evaluation/choices.py); with it, the split is evaluated only if --split is given. Results
go to the console, `<workdir>/eval.jsonl` and TensorBoard (`<workdir>/tensorboard`, tags
eval/... and choices/...), each record with the checkpoint's step.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from configs.loader import parse_run
from errors import fail_cleanly
from train import distributed


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", help="split to evaluate (default: data.eval_split); tfds "
                        "split syntax, e.g. 'train[:5%%]'")
    parser.add_argument("--steps", type=int, help="batches to evaluate (default eval.steps; "
                        "0 = one pass over the split)")
    parser.add_argument("--choices", action="append", default=[],
                        help="JSONL file of multiple-choice items to score; repeatable")
    parser.add_argument("--shots", type=int, default=0, help="k-shot: demonstrations before "
                        "each --choices item (0 = zero-shot)")
    parser.add_argument("--demos", help="JSONL of demonstration items in the --choices format "
                        "(default: the choices file itself, never an item's own line)")
    parser.add_argument("--shot-seed", type=int, default=0, help="seed of the demos' draw")
    parser.add_argument("--predictions", help="fine-tuned task runs: write one JSON line per "
                        "example of the split (input, gold, prediction, score) to this file, "
                        "and the task metrics to FILE.summary.json")
    distributed.add_flags(parser)
    with fail_cleanly("--verbose" in argv):
        args, config_args = parse_run(parser, argv)
        distributed.initialize(args)
        from train.evaluation.evaluate import run   # deferred: --help stays fast
        run(args.workdir, args.step, split=args.split, steps=args.steps, choices=args.choices,
            config_args=config_args, predictions=args.predictions, shots=args.shots,
            demos=args.demos, shot_seed=args.shot_seed)


if __name__ == "__main__":
    main()
