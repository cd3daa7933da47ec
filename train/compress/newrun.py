"""A compressed model written as a new Loom run directory.

The new run holds the run's vocabulary (tokenizer.model), a step-0 checkpoint (the params, a
fresh optimizer state for the new config, with e.g. the pruning masks) and config.json /
config.py, like a model imported from Hugging Face: train.eval, train.generate and train.export
read it, and `python -m train --config OUT/config.py --workdir OUT` trains (or fine-tunes) it
further.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from data.tokenizer import MODEL_FILE
from errors import CheckpointError
from model.sharding import activate
from train import state as state_lib
from train.checkpoint import Checkpointer
from train.config import validate
from train.setup import build

RUN_CONFIG_PY = "config.py"
_RUN_CONFIG = '''"""The config of {what} (this directory's config.json).

Train or fine-tune it further (the pruning masks, if any, are kept) with:
    python -m train --config {path} --workdir {workdir}
"""
import json
from pathlib import Path

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(json.loads((Path(__file__).parent / "config.json").read_text()))
'''


def check_out(out: str | Path, source: str | Path) -> Path:
    """`out` as a path a new run may be written to (nothing is created yet)."""
    out, source = Path(out).expanduser(), Path(source).expanduser()
    if out.resolve() == source.resolve():
        raise CheckpointError(f"--out {out} is the source run; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} already exists and is not an empty directory; "
                              "choose a new one")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CheckpointError(f"cannot create --out {out} ({blocker} is a file); choose another")
    return out


def write(out: Path, source: Path, config: ConfigDict, params: Any, what: str) -> None:
    """Writes `params` (host or device arrays) as step 0 of a new run with `config`
    (validated first: nothing is written for a config that does not hold)."""
    config = ConfigDict(config.to_dict())
    config.data.tokenizer.path = ""   # the run's own tokenizer.model
    config.mesh.update(data=-1, fsdp=1, sequence=1, tensor=1)
    devices = jax.local_devices()[:1]
    validate(config, devices)
    setup = build(config, devices)
    params = jax.device_put(params, setup.state_shardings.params)
    with activate(setup.mesh, setup.rules):
        state = state_lib.from_params(params, setup.tx, setup.state_shardings,
                                      config.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / MODEL_FILE, out / MODEL_FILE)
    ckpt = Checkpointer(out, config.ckpt)
    ckpt.save(0, state, config=config.to_dict())
    ckpt.wait()
    ckpt.close()
    (out / "config.json").write_text(config.to_json_best_effort(indent=2))
    (out / RUN_CONFIG_PY).write_text(_RUN_CONFIG.format(what=what, path=out / RUN_CONFIG_PY,
                                                        workdir=out))
