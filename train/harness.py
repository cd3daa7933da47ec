"""python -m train.harness: lm-evaluation-harness on a Loom run (the `loom` model class).

    python -m train.harness --model_args workdir=runs/x,step=best --tasks lambada_openai \
        [--include_path my_tasks/] [any other lm_eval flag]

Registers train/evaluation/harness.py's `loom` model, then runs lm_eval's own command line with
`--model loom` added. Needs `pip install lm-eval`.
"""
from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from errors import DependencyError, fail_cleanly
    with fail_cleanly("--verbose" in argv):
        try:   # deferred: lm_eval is an optional dependency, and heavy
            from lm_eval.__main__ import cli_evaluate
        except ImportError as e:
            raise DependencyError("python -m train.harness needs lm-eval: pip install "
                                  "lm-eval") from e
        import train.evaluation.harness  # noqa: F401  (registers --model loom)
        if "--model" not in argv:
            argv = ["--model", "loom"] + argv
        sys.argv = ["lm_eval"] + argv
        cli_evaluate()


if __name__ == "__main__":
    main()
