"""python -m train.sweep: run a grid or random search of Loom runs, and collect their results.

    python -m train.sweep --config configs/quickstart.py --out sweeps/lr \\
        --sweep opt.lr=1e-3,2e-3,4e-3 --sweep model.n_layers=2,4 [--config.train.steps=200 ...]
    python -m train.sweep ... --random 12 --sweep 'opt.lr=loguniform(1e-4,1e-2)' --seed 0
    python -m train.sweep ... --launcher local|slurm|print [--parallel K]
    python -m train.sweep --out sweeps/lr --collect

--sweep KEY=SPEC: a list v1,v2,... (a grid's axis) or, with --random N, choice(v1,...),
uniform(lo,hi), loguniform(lo,hi) or int(lo,hi). --config.KEY=VALUE overrides apply to every
trial. Every trial's config is validated before any runs. Each trial is an ordinary run in
OUT/<name> (train.eval, train.generate, resume and export work on it); OUT/sweep.json lists them.
Running the same command again skips finished trials and resumes interrupted ones. The local
launcher ends by collecting: OUT/results.csv, OUT/results.md, PNG plots and TensorBoard hparams.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from configs.loader import add_verbose, configure_logging, help_table
from configs.base import get_config as base_config
from errors import ConfigError, fail_cleanly


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment file, e.g. configs/quickstart.py")
    parser.add_argument("--out", required=True, help="sweep directory: one run per trial")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=SPEC",
                        help="a swept key and its values or distribution; repeatable")
    parser.add_argument("--random", type=int, default=0, metavar="N",
                        help="random search: draw N trials (default: the grid of every --sweep)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--launcher", default="local", choices=("local", "slurm", "print"),
                        help="local: run here; slurm: write an sbatch array script; print: "
                             "print the commands")
    parser.add_argument("--parallel", type=int, default=1, metavar="K",
                        help="trials at once (local: the devices are split between them; "
                             "slurm: the array's concurrency limit)")
    parser.add_argument("--devices", type=int, default=0, metavar="N",
                        help="devices a trial will have, for validating its mesh (default: "
                             "this machine's, split by --parallel)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="an #SBATCH option for --launcher slurm, e.g. --sbatch=--gres=gpu:8")
    parser.add_argument("--collect", action="store_true",
                        help="only write results.csv/.md, plots and hparams from OUT")
    parser.add_argument("--target", default="eval/loss",
                        help="metric the results are sorted and plotted by (eval/loss, "
                             "eval/accuracy, ...)")
    parser.add_argument("--maximize", action="store_true", help="higher --target is better")
    add_verbose(parser)
    parser.epilog = "shared config overrides (--config.KEY=VALUE):\n" + help_table(base_config())
    with fail_cleanly("--verbose" in argv):
        args, rest = parser.parse_known_args(argv)
        configure_logging()
        if args.collect:
            if rest or args.sweep:
                raise ConfigError("--collect reads OUT/sweep.json; it takes no --sweep or "
                                  "--config.* arguments")
            return _collect(args)
        if not args.config:
            raise ConfigError("--config is required to plan a sweep (or use --collect)")
        _run(args, rest)


def _run(args: argparse.Namespace, shared: list[str]) -> None:
    child_env = dict(os.environ)
    # The sweep only counts the devices; it must not take a GPU's memory from its trials.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax   # deferred, like the library below: --help stays fast
    from train.sweeps import launch, plan, results

    n_devices = jax.device_count()
    slots = launch.device_slots(args.parallel, jax.default_backend(), n_devices, child_env) \
        if args.launcher == "local" else [{}]
    per_trial = args.devices or (max(n_devices // len(slots), 1) if len(slots) > 1 else n_devices)
    sweep = plan.resolve(args.out, args.config, shared, args.sweep, random=args.random,
                         seed=args.seed, devices=[None] * per_trial)  # validate counts them
    plan.write(sweep)
    if args.launcher == "print":
        launch.print_commands(sweep)
    elif args.launcher == "slurm":
        script = launch.write_slurm(sweep, sbatch=args.sbatch, parallel=args.parallel
                                    if args.parallel > 1 else 0)
        print(f"wrote {script} ({len(sweep.trials)} array tasks); submit with:\n  sbatch {script}")
    else:
        try:
            statuses = launch.run_local(sweep, slots=slots, env=child_env)
        except KeyboardInterrupt:
            sys.exit(130)
        counts = {s: sum(v["status"] == s for v in statuses.values()) for s in plan.STATES}
        print("sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        _report(results.collect(args.out, args.target, args.maximize))


def _collect(args: argparse.Namespace) -> None:
    from train.sweeps import results   # deferred: --help stays fast
    _report(results.collect(args.out, args.target, args.maximize))


def _report(collected: dict) -> None:
    for path, size in collected["files"].items():
        print(f"wrote {path}" + (f" ({size[0]}x{size[1]} px)" if size else ""))
    md = next(p for p in collected["files"] if p.endswith(".md"))
    print(open(md).read(), end="")


if __name__ == "__main__":
    main()
