"""nanodo's own train step (google-deepmind/nanodo, `train._train_step`), timed on the shape of a
reference_gpt.py preset, from a nanodo checkout given by path (nanodo is not a Loom dependency).

Its model, loss, metrics and optimizer are nanodo's code, built as its `Trainer` builds them
(`_init_train_state`, the jitted `_train_step` with nanodo's shardings and donation) from its
default config with the shape and dtype overridden. Its MLP is GELU with F = 3/2 * d_ff, the
weight count of a SwiGLU of width d_ff; `log_internal_metrics` is off (nanodo's default turns on
per-layer statistics, which only slow it down). nanodo imports `clu` for its training loop's
metric writers; when clu is not installed, empty modules stand in for it, which the train step
never touches.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from errors import ConfigError

COMMIT = "10aefde"   # the nanodo commit the comparison was written against


@contextlib.contextmanager
def _importable(checkout: Path) -> Iterator[None]:
    added = [name for name in ("clu", "clu.metric_writers", "clu.periodic_actions")
             if _missing(name)]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(checkout))
    try:
        yield
    finally:
        sys.path.remove(str(checkout))


def _missing(name: str) -> bool:
    if name in sys.modules:
        return False
    try:
        __import__(name)
        return False
    except ImportError:
        return True


def load(path: str) -> dict[str, Any]:
    """nanodo's train, model_factory and default-config modules from the checkout at `path`
    (the repository root, or its nanodo/ package directory)."""
    root = Path(path)
    if (root / "nanodo" / "train.py").is_file():
        pass
    elif (root / "train.py").is_file() and root.name == "nanodo":
        root = root.parent
    else:
        raise ConfigError(f"--nanodo {path}: no nanodo checkout there (expected nanodo/train.py; "
                          f"git clone https://github.com/google-deepmind/nanodo, commit {COMMIT})")
    with _importable(root):
        try:
            from nanodo import model_factory, train
            from nanodo.configs import default
        except ImportError as e:
            raise ConfigError(f"--nanodo {path}: importing nanodo failed ({e}); it needs flax, "
                              "optax, orbax, grain, tensorflow_datasets and sentencepiece") from e
    return dict(train=train, model_factory=model_factory, default=default)


def measure(modules: dict[str, Any], shape: tuple[int, ...], dtype: str, steps: int,
            warmup: int = 2) -> dict[str, Any]:
    """Times nanodo's compiled `_train_step` on random tokens of `shape` = (vocab, d, heads,
    layers, d_ff, seq, batch); prints and returns one JSON line."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh
    from train.perf import hlo

    train, factory = modules["train"], modules["model_factory"]
    vocab, d, heads, layers, ff, seq, batch = shape
    c = modules["default"].get_config()
    c.model.update(D=d, H=heads, L=seq, N=layers, F=3 * ff // 2, dtype=dtype)
    c.batch_size, c.log_internal_metrics = batch, False
    mesh = Mesh(mesh_utils.create_device_mesh((jax.device_count(),)), ("data",))
    model, loss_fn = factory.get_model_and_loss(c, vocab)
    shardings, state = train._init_train_state(c, model, rng=jax.random.PRNGKey(0), mesh=mesh)
    trainer = train.Trainer(c=c, state=state, mesh=mesh, shardings=shardings,
                            get_loss_fn=loss_fn)
    # its step donates the batch too: one fresh copy per call
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 1, vocab, jnp.int32)
    batches = [jnp.copy(tokens) for _ in range(warmup + steps + 1)]
    t0 = time.perf_counter()
    step = trainer.step_fn.lower(state, batches[-1]).compile()
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, metrics = step(state, batches[i])
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        state, metrics = step(state, batches[i])
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / steps
    out = dict(system="nanodo", commit=COMMIT, dtype=dtype, batch=batch, seq=seq,
               step_s=round(dt, 4), tok_per_s=round(batch * seq / dt),
               compile_s=round(compile_s, 1), loss=round(float(metrics["train_loss"]), 4),
               **hlo.stats(step))
    print(json.dumps(out), flush=True)
    return out
