"""Compile time of the train step against depth, with the layers scanned and unrolled."""
from __future__ import annotations

import json
import time
from typing import Any, Sequence

from ml_collections import ConfigDict

from model.sharding import activate
from train import families, state as state_lib
from train.config import validate
from train.setup import build


def compile_seconds(config: ConfigDict) -> float:
    """Seconds to lower and compile the train step of `config` on abstract state."""
    validate(config)
    setup = build(config)
    with activate(setup.mesh, setup.rules):
        state = state_lib.abstract(setup.model, setup.model_cfg, setup.tx, setup.state_shardings)
        batch = families.synthetic_batch(config, setup.batch_sharding)
        t0 = time.perf_counter()
        setup.train_step().lower(state, batch).compile()
        return time.perf_counter() - t0


def report(config: ConfigDict, depths: Sequence[int] = (12, 24, 48)) -> list[dict[str, Any]]:
    """One JSON line per (scan_layers, depth): compile seconds and the ratio to the shallowest
    depth of the same setting. `config`'s width is kept (use a tiny one: time, not memory)."""
    if not config.model.vocab_size:
        config.model.vocab_size = config.data.tokenizer.vocab_size
    warm = ConfigDict(config.to_dict())   # untimed: the process's first compile pays start-up
    warm.model.update(n_layers=1, scan_layers=False)
    compile_seconds(warm)
    rows = []
    for scan in (True, False):
        first = None
        for depth in depths:
            cfg = ConfigDict(config.to_dict())
            cfg.model.update(n_layers=depth, scan_layers=scan)
            seconds = compile_seconds(cfg)
            first = first or seconds
            row = dict(report="compile", scan_layers=scan, n_layers=depth,
                       d_model=cfg.model.d_model, remat=cfg.model.remat,
                       compile_s=round(seconds, 2), vs_first=round(seconds / first, 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows
