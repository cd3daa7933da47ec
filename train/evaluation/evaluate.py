"""Evaluation of a model: token-weighted loss, perplexity, accuracy and bits per byte over a
split, and `run`, which evaluates a saved checkpoint on whatever devices are present (the
`python -m train.eval` command, train/eval.py).

`split` names a split of the run's data, or of another corpus or tfds dataset chosen with
data overrides; the run's own tokenizer is used. `steps` batches (default eval.steps; 0 = one
pass over the split, leaving out a last partial batch). `choices` files are scored as
multiple-choice items (train/evaluation/choices.py); with them, the split is evaluated only if
one is named. Results go to `<workdir>/eval.jsonl` and TensorBoard (`<workdir>/tensorboard`,
tags eval/... and choices/...), each record with the checkpoint's step.
"""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data import pipeline, tasks as tasks_lib
from data.tokenizer import BOS, Tokenizer
from errors import DataError
from model.sharding import activate
from train.evaluation import choices as choices_lib
from train.finetune import predict
from train.metrics import MetricsLog
from train.restore import Restored, restore, saved_config


def evaluate(eval_step: Callable[..., dict[str, jax.Array]], params: Any,
             batches: Iterator[dict[str, jax.Array]], num_batches: int | None,
             count_bytes: Callable[[dict[str, jax.Array]], jax.Array] | None = None
             ) -> dict[str, float]:
    """Token-weighted means over `num_batches` batches (None: until `batches` ends), not a mean
    of per-batch means. With `count_bytes` (see `byte_counter`) also bits per byte: the summed
    loss in bits over the UTF-8 bytes of the text the weighted targets stand for."""
    totals: dict[str, float] = {}
    for batch in itertools.islice(batches, num_batches):
        sums = eval_step(params, batch)
        if count_bytes is not None:
            sums = {**sums, "bytes": count_bytes(batch)}
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    if not totals:
        raise DataError("no evaluation batches: the split has fewer rows than one batch "
                        "(data.batch_size)")
    weight = max(totals.pop("weight"), 1.0)
    n_bytes = totals.pop("bytes", None)
    out = {k: v / weight for k, v in totals.items()}
    out["perplexity"] = math.exp(min(out["loss"], 700.0))
    out["tokens"] = weight
    if n_bytes:
        out.update(bits_per_byte=totals["loss"] / math.log(2) / n_bytes, bytes=n_bytes,
                   bytes_per_token=n_bytes / weight)
    return out


def byte_counter(tokenizer: Tokenizer, batch_sharding: NamedSharding
                 ) -> Callable[[dict[str, jax.Array]], jax.Array]:
    """Jitted: a causal-LM batch -> the UTF-8 bytes of the text its weighted targets decode to.

    Each target counts its piece's bytes (`Tokenizer.piece_bytes`: byte-fallback pieces 1, the
    leading-space marker 1, control pieces 0). Sentencepiece puts a dummy space before each
    encoded text, in a document's first piece (the target after BOS), and decoding drops it
    again, so that piece counts one byte less.
    """
    bytes_V = jnp.asarray(tokenizer.piece_bytes(), jnp.float32)
    dummy = float(tokenizer.adds_dummy_prefix)

    def count(batch):
        bytes_BxT = bytes_V[batch["targets"]]
        first_BxT = (batch["inputs"] == BOS) & (bytes_BxT > 0)
        return jnp.sum((bytes_BxT - dummy * first_BxT) * batch["weights"])

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(count, in_shardings=(batch_sharding,), out_shardings=replicated)


def dataset_name(data_cfg) -> str:
    return data_cfg.tfds_name if data_cfg.source == "tfds" else data_cfg.source


def evaluate_split(restored: Restored, split: str, steps: int) -> dict[str, float]:
    """Loss, perplexity, accuracy (and bits per byte for causal LMs) of a restored run on
    `split` of its data config: `steps` batches, or one pass when 0. Call inside the run's
    `activate(mesh, rules)`."""
    setup, data_cfg, tokenizer = restored.setup, restored.config.data, restored.tokenizer
    objective = restored.config.train.objective
    if steps == 0:
        if jax.process_count() > 1:
            raise DataError("--steps 0 (one pass) needs a single process: hosts could see "
                            "different numbers of batches; give a number of batches")
        batches = pipeline.GlobalBatches(
            pipeline.local_batches(data_cfg, tokenizer, split, objective=objective,
                                   local_batch=data_cfg.batch_size, shuffle=False, num_epochs=1),
            setup.batch_sharding, data_cfg.batch_size)
    else:
        batches = pipeline.eval_batches(data_cfg, tokenizer, setup.batch_sharding, split,
                                        objective=objective)
    count_bytes = (byte_counter(tokenizer, setup.batch_sharding)
                   if setup.objective.bits_per_byte else None)
    return evaluate(setup.eval_step(), restored.params, batches, steps or None, count_bytes)


def _tag(*parts: str) -> str:
    """A TensorBoard-safe tag prefix (tfds split syntax has brackets, colons, percents)."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.\-]", "_", p) for p in parts) + "/"


def run(workdir: str | Path, step: str | int = "latest", *, split: str | None = None,
        steps: int | None = None, choices: Sequence[str] = (), config_args: Sequence[str] = (),
        devices: Sequence[jax.Device] | None = None,
        predictions: str | Path | None = None, shots: int = 0, demos: str | None = None,
        shot_seed: int = 0) -> dict[str, dict[str, Any]]:
    """Evaluates a checkpoint of `workdir` (see the module docstring); returns the records
    written, by name ("eval/<dataset>/<split>", "choices/<file stem>"). A fine-tuned run's
    record adds the task metrics over every record of the split (train/finetune/predict.py),
    and `predictions` names a JSONL file for one line per example. `shots` > 0 puts that many
    demonstrations (from `demos`, default each choices file itself, drawn by `shot_seed`) before
    every choices item (choices.with_shots)."""
    tasks = [(path, choices_lib.read_items(path)) for path in choices]  # fail before restoring
    if shots or demos:   # k-shot: demonstrations from the demo file (default: the task's own)
        tasks = [(path, choices_lib.with_shots(
            items, choices_lib.read_items(demos) if demos else items, shots, shot_seed))
            for path, items in tasks]
    if tasks:   # a family that writes no text cannot score continuations
        choices_lib.prompting(saved_config(workdir, step)[0].model.family)
    restored = restore(workdir, step, config_args=config_args, devices=devices)
    config = restored.config
    split = split or (None if choices else config.data.eval_split)
    steps = config.eval.steps if steps is None else steps
    if steps < 0:
        raise DataError(f"--steps must be >= 0 (0 = one pass over the split), got {steps}")
    log = MetricsLog(restored.workdir, 0, progress=False, filename="eval.jsonl")
    results = {}
    try:
        with activate(restored.setup.mesh, restored.setup.rules):
            if split:
                prefix = _tag("eval", dataset_name(config.data), split)
                metrics = evaluate_split(restored, split, steps)
                if config.train.objective in tasks_lib.TASKS:
                    task_metrics, preds = predict.evaluate_task(
                        restored.setup, restored.params, restored.tokenizer, split)
                    if predictions:
                        predict.write_predictions(predictions, preds, task_metrics)
                    metrics.update({k: v for k, v in task_metrics.items()
                                    if isinstance(v, (int, float))})
                elif predictions:
                    raise DataError("--predictions is for fine-tuned task runs (train.objective "
                                    f"in {tasks_lib.TASKS}), not train.objective="
                                    f"{config.train.objective}")
                results[prefix[:-1]] = log.write(restored.step, {
                    **metrics, "dataset": dataset_name(config.data), "data_split": split,
                    "batches": steps or None}, prefix=prefix)
            for path, items in tasks:
                prefix = _tag("choices", Path(path).stem)
                metrics = choices_lib.summarize(choices_lib.score_items(restored, items))
                results[prefix[:-1]] = log.write(restored.step, {**metrics, "file": str(path)},
                                                 prefix=prefix)
    finally:
        log.close()
    return results
