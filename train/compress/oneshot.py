"""One-shot magnitude pruning of a trained run into a new run (`train.compress prune`).

The new run's params have the pruned weights at zero; its config sets prune.* to the same
sparsity, pattern and scope, pruning "once at the first step" (start = end = 0), so the
optimizer state holds masks equal to the zeros (train/pruning.py: a zero weight starts
pruned) and training or fine-tuning it keeps them (the ranking puts them lowest, so that one
mask update re-selects exactly them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from errors import ConfigError
from train import pruning
from train.compress import newrun
from train.config import validate
from train.restore import restore

REPORT_FILE = "prune.json"


def sparsity_for(pattern: str, sparsity: float | None) -> float:
    """The run's target sparsity: `sparsity`, or for N:M (where it is 1 - N/M) that value."""
    nm = pruning.parse_pattern(pattern, "--pattern")
    if sparsity is None:
        if nm is None:
            raise ConfigError("--sparsity is required for --pattern unstructured (a fraction "
                              "in [0, 1), e.g. 0.5)")
        return pruning.nm_sparsity(nm)
    if not 0 <= sparsity < 1:
        raise ConfigError(f"--sparsity {sparsity}: the fraction of weights pruned must be in "
                          "[0, 1)")
    return sparsity


def prune_params(params: Any, sparsity: float, pattern: str, scope: str) -> Any:
    """`params` with `sparsity` of the blocks' kernel weights pruned by magnitude."""
    nm = pruning.parse_pattern(pattern)
    masks = jax.jit(lambda p: pruning.magnitude_masks(
        p, pruning.initial_masks(p), jnp.float32(sparsity), nm=nm, scope=scope))(params)
    return jax.jit(pruning.apply)(params, masks)


def prune_run(workdir: str | Path, out: str | Path, *, step: str = "latest",
              sparsity: float | None = None, pattern: str = "unstructured",
              scope: str = "layer") -> dict[str, float]:
    """Prunes the run at `workdir` (checkpoint `step`) into the new run `out`; returns the
    zero fraction of each pruned kernel (and 'all'), also written to `out/prune.json`."""
    workdir = Path(workdir).expanduser()
    out = newrun.check_out(out, workdir)
    sparsity = sparsity_for(pattern, sparsity)
    restored = restore(workdir, step, devices=jax.local_devices()[:1])
    config = restored.config
    config.prune.update(target=sparsity, pattern=pattern, scope=scope, start=0, end=0)
    try:
        validate(config, jax.local_devices()[:1])
    except ConfigError as e:   # name the flags, not the keys they set
        raise ConfigError(str(e).replace("prune.pattern=", "--pattern ")
                          .replace("prune.scope=", "--scope ")) from None
    params = prune_params(restored.params, sparsity, pattern, scope)
    report = pruning.per_layer(params)
    newrun.write(out, workdir, config, params,
                 f"{workdir} (step {restored.step}) pruned to sparsity {sparsity:g} "
                 f"({pattern}, scope {scope})")
    (out / REPORT_FILE).write_text(json.dumps(
        {"source": str(workdir), "step": restored.step, "sparsity": sparsity,
         "pattern": pattern, "scope": scope, "per_layer": report}, indent=2))
    return report
