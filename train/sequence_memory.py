"""What sequence (context) parallelism saves: per-device memory of the compiled train step at long
lengths, with the length on one device (`mesh.sequence=1`) or split over several, from XLA's
`memory_analysis()` (nothing runs, so lengths far beyond the machine's memory can be compared).

Every layout gives each data shard one row, so a device holds one row's tokens with
`sequence=1` and a 1/s slice of it with `sequence=s`: the mesh is data = devices / s x
sequence = s, and the global batch has one row per data shard. `python -m train.benchmark
--sequence-memory` (train/benchmark.py) prints one JSON line per layout and then a table.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
from ml_collections import ConfigDict

from errors import ConfigError
from model.sharding import activate
from train import families, state as state_lib
from train.config import validate
from train.setup import build

MIB = 2**20


def _layout(config: ConfigDict, seq_len: int, sequence: int) -> ConfigDict:
    n = jax.device_count()
    c = ConfigDict(config.to_dict())
    if not c.model.vocab_size:    # no tokenizer here: the size it would have
        c.model.vocab_size = c.data.tokenizer.vocab_size
    c.model.max_len = max(c.model.max_len, seq_len)
    c.data.update(seq_len=seq_len, batch_size=n // sequence)
    c.opt.grad_accum = 1
    c.mesh.update(data=n // sequence, fsdp=1, sequence=sequence, tensor=1)
    return c


def measure_one(config: ConfigDict, seq_len: int, sequence: int) -> dict[str, Any]:
    """Compiles one layout's train step and reads its per-device memory."""
    c = _layout(config, seq_len, sequence)
    validate(c)
    setup = build(c)
    with activate(setup.mesh, setup.rules):
        state = state_lib.abstract(setup.model, setup.model_cfg, setup.tx, setup.state_shardings)
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                             families.synthetic_batch(c, setup.batch_sharding))
        stats = setup.train_step().lower(state, batch).compile().memory_analysis()
    return dict(seq=seq_len, sequence=sequence, mesh=dict(setup.mesh.shape),
                tokens_per_device=seq_len // sequence, objective=c.train.objective,
                temp_MiB=round(stats.temp_size_in_bytes / MIB, 1),
                argument_MiB=round(stats.argument_size_in_bytes / MIB, 1),
                output_MiB=round(stats.output_size_in_bytes / MIB, 1))


def measure(config: ConfigDict, seq_lens: Sequence[int] = (8192, 32768),
            sizes: Sequence[int] = (1, 4)) -> list[dict[str, Any]]:
    """Every (length, sequence size) pair: a JSON line each, then a table."""
    n = jax.device_count()
    bad = [s for s in sizes if s < 1 or n % s]
    if bad:
        raise ConfigError(f"--sequence-sizes {bad} do not divide the {n} devices; on a CPU, "
                          "XLA_FLAGS=--xla_force_host_platform_device_count=8 gives 8")
    rows = []
    for seq_len in seq_lens:
        for size in sizes:
            row = measure_one(config, seq_len, size)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nper-device memory of the compiled train step ({n} {jax.devices()[0].platform} "
          f"devices, one row per data shard)")
    print("| seq | mesh.sequence | tokens/device | temp MiB | arguments MiB | outputs MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seq']} | {r['sequence']} | {r['tokens_per_device']} | {r['temp_MiB']} | "
              f"{r['argument_MiB']} | {r['output_MiB']} |")
    return rows
