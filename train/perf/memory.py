"""Per-device memory of the compiled train step across meshes, from XLA's memory analysis.

The step is lowered on abstract state and batch (nothing is allocated), so a 125M model fits
this on 8 fake CPU devices. Parameter and optimizer-state bytes are the per-device shards of the
state's shardings; argument, output and temporary (activation) bytes are
`compiled.memory_analysis()`'s.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from errors import ConfigError
from model.sharding import activate
from train import families, state as state_lib
from train.config import validate
from train.setup import build

MESHES = ((("fsdp", 1),), (("fsdp", 2),), (("fsdp", 4),), (("fsdp", 8),), (("tensor", 2),),
          (("tensor", 4),))


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of the ShapeDtypeStructs in `tree` (the largest shard per leaf)."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree)))


def mesh_config(config: ConfigDict, axes: Sequence[tuple[str, int]]) -> ConfigDict:
    """`config` on a mesh with the named axis sizes and data parallelism over the rest."""
    config = ConfigDict(config.to_dict())
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.mesh.update(dict(axes))
    return config


def report(config: ConfigDict, meshes: Sequence[Sequence[tuple[str, int]]] = MESHES
           ) -> list[dict[str, Any]]:
    """One JSON line per mesh: per-device bytes of params, optimizer state, step arguments,
    outputs and temporaries, and params + optimizer state relative to the first mesh."""
    if not config.model.vocab_size:
        config.model.vocab_size = config.data.tokenizer.vocab_size
    rows, first = [], None
    for axes in meshes:
        cfg = mesh_config(config, axes)
        if np.prod([n for _, n in axes]) > jax.device_count():
            raise ConfigError(f"--memory: mesh {dict(axes)} needs more than the "
                              f"{jax.device_count()} devices here")
        validate(cfg)
        setup = build(cfg)
        with activate(setup.mesh, setup.rules):
            state = state_lib.abstract(setup.model, setup.model_cfg, setup.tx,
                                       setup.state_shardings)
            batch = families.synthetic_batch(cfg, setup.batch_sharding)   # small: B x T ids
            compiled = setup.train_step().lower(state, batch).compile()
        mem = compiled.memory_analysis()
        params, opt = shard_bytes(state.params), shard_bytes(state.opt_state)
        first = first or params + opt
        row = dict(report="memory", mesh=dict(setup.mesh.shape), n_devices=setup.mesh.size,
                   params_M=round(state_lib.param_count(state.params) / 1e6, 1),
                   batch=cfg.data.batch_size, seq=cfg.data.seq_len,
                   params_bytes=params, opt_state_bytes=opt,
                   params_opt_vs_first=round((params + opt) / first, 4),
                   argument_bytes=int(mem.argument_size_in_bytes),
                   output_bytes=int(mem.output_size_in_bytes),
                   temp_bytes=int(mem.temp_size_in_bytes),
                   alias_bytes=int(mem.alias_size_in_bytes))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows
