"""Loom's error types: one hierarchy below `LoomError`, the bottom layer every package imports.

Each is raised for bad input a user can fix (a config value, a data file, a checkpoint, a
missing package) with a message that names the problem and what to do; every CLI turns a
`LoomError` into that one line and exit status 2 (`train.cli.fail_cleanly`). The cause, when
there is one, is kept (`raise ... from e`) and shown with `--verbose` or LOOM_VERBOSE=1.
Anything else escaping a CLI is a bug in Loom, and keeps its traceback.

They also derive from `ValueError` (or `ImportError`), so callers that expect the built-in
type keep working.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator


class LoomError(Exception):
    """Bad input a user can fix; the message says what and how."""


class ConfigError(LoomError, ValueError):
    """A config file, key or value that cannot work, alone or with other keys."""


class ModelConfigError(ConfigError):
    """A model hyper-parameter (the `model` section) that cannot work; names the key."""


class MeshError(ConfigError):
    """A device mesh or sharding rule that does not fit the devices or the model."""


class DataError(LoomError, ValueError):
    """A data source, file, split or tokenizer that cannot be read or used."""


class CheckpointError(LoomError, ValueError):
    """A checkpoint or run directory that is missing, unreadable or does not fit this run."""


class TrainingDiverged(LoomError):
    """The loss or gradient norm became NaN/Inf (train.nonfinite=halt); names the step and the
    last good checkpoint."""


class ConversionError(LoomError, ValueError):
    """A model that does not map onto another format (a Hugging Face architecture, a layout)."""


class DependencyError(LoomError, ImportError):
    """An optional package a feature needs is not installed; says what to pip install."""


VERBOSE_ENV = "LOOM_VERBOSE"


@contextlib.contextmanager
def fail_cleanly(verbose: bool = False) -> Iterator[None]:
    """What every CLI runs in: a `LoomError` becomes `error: <message>` on stderr and exit
    status 2. With `verbose` (a CLI's --verbose) or LOOM_VERBOSE=1 the traceback and the chain
    of causes come first."""
    try:
        yield
    except LoomError as e:
        if verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
        elif e.__cause__ is not None:
            print(f"error: {e} [{VERBOSE_ENV}=1 or --verbose shows the underlying "
                  f"{type(e.__cause__).__name__}]", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # Ctrl-C before a command's own handler (train/preempt.py) is set
        print("interrupted", file=sys.stderr)
        sys.exit(130)
