"""python -m train.export: Loom checkpoints <-> Hugging Face model directories.

    python -m train.export to-hf --workdir runs/q --out runs/q-hf [--step latest|best|N]
        [--layout llama|gpt2|bert|roberta|albert|t5] [--peft-adapter DIR]
    python -m train.export from-hf --hf runs/q-hf --workdir runs/q2 [--config FILE]
        [--config.KEY=VALUE ...]

See train/hf/convert.py for what each direction writes.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from configs.loader import parse
from errors import ConfigError, fail_cleanly
from train import distributed


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m train.export",
        description="Convert between Loom checkpoints and Hugging Face model directories.")
    commands = parser.add_subparsers(dest="command", required=True)
    to = commands.add_parser("to-hf", help="a run's checkpoint -> a Hugging Face directory")
    to.add_argument("--workdir", required=True, help="the training run's directory")
    to.add_argument("--step", default="latest", help="latest | best | a step number")
    to.add_argument("--out", required=True, help="new directory for the Hugging Face model")
    to.add_argument("--layout", help="Hugging Face architecture, one of the family's layouts "
                    "(train/families.py: llama, gpt2, bert, roberta, albert, t5); default: the one "
                    "the model fits")
    to.add_argument("--peft-adapter", metavar="DIR", help="a decoder LoRA run: write the "
                    "frozen backbone to --out and the adapters to DIR in PEFT's format "
                    "(adapter_config.json + adapter_model.safetensors); default: merged")
    to.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    from_hf = commands.add_parser(
        "from-hf", help="a Hugging Face directory -> a new Loom run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from_hf.add_argument("--hf", required=True, help="Hugging Face model directory")
    from_hf.add_argument("--workdir", required=True, help="new run directory")
    for command in (to, from_hf):
        distributed.add_flags(command)
    with fail_cleanly("--verbose" in argv):
        if argv[:1] == ["from-hf"]:
            args, config = parse(from_hf, argv[1:], config_required=False)
            if distributed.initialize(args) > 1:
                raise ConfigError("from-hf makes a new run in one process; run it on one host "
                                  "(--num-processes 1), then train on all of them")
            from train.hf.convert import import_hf   # deferred: --help stays fast
            path = import_hf(args.hf, args.workdir, config, config_args=argv[1:])
            if distributed.main_process():
                print(f"imported {args.hf} into {args.workdir}; continue training with:\n"
                      f"  python -m train --config {path} --workdir {args.workdir}")
        else:
            args = parser.parse_args(argv)
            distributed.initialize(args)
            from train.hf.convert import export   # deferred: --help stays fast
            out = export(args.workdir, args.out, args.step, args.layout, args.peft_adapter)
            from train.restore import saved_config   # deferred: --help stays fast
            quant = saved_config(args.workdir, args.step)[0].quant
            if distributed.main_process() and quant.mode == "ptq":
                print(f"note: {args.workdir} is quantized ({quant.weights} weights); its "
                      "kernels were dequantized to float32 for Hugging Face")
            if distributed.main_process():
                print(f"wrote {out}" + (f" and the PEFT adapter {args.peft_adapter}"
                                        if args.peft_adapter else ""))


if __name__ == "__main__":
    main()
