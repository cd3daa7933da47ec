"""Assembles the data pipeline for a config: source -> tokenize -> rows -> batches -> jax.Arrays.

Each process reads its own slice of the documents and builds its slice of the global batch;
`jax.make_array_from_process_local_data` joins the slices into one sharded array. The grain
iterator's state goes into every checkpoint, so a resumed run sees exactly the batches an
uninterrupted one would have.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import grain
from grain.experimental import InterleaveIterDataset, WindowShuffleIterDataset
import jax
import numpy as np
from jax.sharding import NamedSharding

from data import builder as builder_lib
from data import packing
from data import tokenizer as tokenizer_lib
from data.sources import DataError
from data.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.model"


def text_field(data_cfg: Mapping[str, Any]) -> str:
    return data_cfg["text_field"] if data_cfg["source"] == "tfds" else "text"


def _as_text(record: Mapping[str, Any], field: str) -> str:
    value = record[field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def documents(data_cfg: Mapping[str, Any], split: str) -> grain.MapDataset:
    """The split's documents as text, in storage order (random access)."""
    prepared = builder_lib.prepare(data_cfg)
    field = text_field(data_cfg)
    source = builder_lib.data_source(prepared, split, field)
    if len(source) == 0:
        raise DataError(f"split {split!r} of {prepared.name} has no documents")
    return grain.MapDataset.source(source).map(lambda record: _as_text(record, field))


def load_or_train_tokenizer(data_cfg: Mapping[str, Any], workdir: str | Path) -> Tokenizer:
    """The run's vocabulary: `workdir/tokenizer.model`, created on the first run.

    It comes from `data.tokenizer.path` or is trained on a sample of the train split. On a later
    run it is re-read from the workdir, and a configured path holding a different vocabulary is an
    error instead of a silent switch.
    """
    tok_cfg = data_cfg["tokenizer"]
    run_copy = Path(workdir) / TOKENIZER_FILE
    configured = Tokenizer.load(tok_cfg["path"]) if tok_cfg["path"] else None
    if run_copy.exists():
        tokenizer = Tokenizer.load(run_copy)
        if configured is not None and configured.fingerprint != tokenizer.fingerprint:
            raise DataError(
                f"data.tokenizer.path={tok_cfg['path']} differs from the vocabulary this run was "
                f"started with ({run_copy}); resuming would switch vocabularies. Use a new "
                "--workdir, or point data.tokenizer.path at the run's tokenizer")
        return tokenizer
    if configured is not None:
        tokenizer = configured
    else:
        logging.info("training a %s tokenizer of %d pieces on the train split",
                     tok_cfg["model_type"], tok_cfg["vocab_size"])
        sample = documents(data_cfg, data_cfg["train_split"]).shuffle(seed=data_cfg["shuffle_seed"])
        tokenizer = tokenizer_lib.train(iter(sample), vocab_size=tok_cfg["vocab_size"],
                                        model_type=tok_cfg["model_type"],
                                        max_chars=tok_cfg["sample_chars"])
    if jax.process_index() == 0:
        tokenizer.save(run_copy)
    return tokenizer


def local_batches(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, split: str, *,
                  local_batch: int, shuffle: bool, num_epochs: int | None,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """This process's batches of causal-LM rows (numpy dicts of [local_batch, seq_len])."""
    docs = documents(data_cfg, split)
    if len(docs) < process_count:
        raise DataError(f"split {split!r} has {len(docs)} documents, fewer than the "
                        f"{process_count} processes that must each read a share")
    docs = docs[process_index::process_count]
    if shuffle:
        docs = docs.shuffle(seed=data_cfg["shuffle_seed"])
    docs = docs.repeat(num_epochs)
    seq_len, pad = data_cfg["seq_len"], tokenizer_lib.PAD

    def pieces_of(text: str) -> grain.MapDataset:
        ids = tokenizer.encode(text)
        return grain.MapDataset.source(packing.document_pieces(ids, seq_len, tokenizer_lib.BOS,
                                                               tokenizer_lib.EOS))

    # Long documents yield many consecutive pieces: drawing pieces from `interleave` documents
    # at once, then shuffling rows in a window, keeps every batch a mix of many documents.
    pieces = InterleaveIterDataset(docs.map(pieces_of),
                                   cycle_length=data_cfg["interleave"] if shuffle else 1)
    rows = packing.clm_rows(pieces, seq_len, packing=data_cfg["packing"], pad_id=pad)
    if shuffle and data_cfg["shuffle_window"] > 1:
        rows = WindowShuffleIterDataset(rows, window_size=data_cfg["shuffle_window"],
                                        seed=data_cfg["shuffle_seed"])
    batches = rows.batch(local_batch, drop_remainder=True)
    if data_cfg["worker_count"] > 0 and shuffle:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg["worker_count"]))
    return batches


class GlobalBatches:
    """Iterator of global, sharded batches over a checkpointable grain iterator.

    `get_state`/`set_state` speak JSON bytes, which is how grain's orbax handler stores
    iterators that are not grain's own; `set_state` restores the tuples JSON turned into lists
    (grain's packing state compares them as tuples and resumes wrongly otherwise).
    """

    def __init__(self, batches: grain.IterDataset, sharding: NamedSharding, global_batch: int):
        self.grain_iterator = iter(batches)
        self.sharding = sharding
        self.global_batch = global_batch

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self.grain_iterator)
        return {k: jax.make_array_from_process_local_data(
            self.sharding, v, (self.global_batch,) + v.shape[1:]) for k, v in local.items()}

    def get_state(self) -> bytes:
        return json.dumps(self.grain_iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        template = self.grain_iterator.get_state()
        self.grain_iterator.set_state(_like(json.loads(state), template))

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore."""
        if hasattr(self.grain_iterator, "start_prefetch"):
            self.grain_iterator.start_prefetch()


def _like(value: Any, template: Any) -> Any:
    """`value` (from JSON) with tuples wherever `template` has them."""
    if isinstance(template, dict) and isinstance(value, dict):
        return {k: _like(v, template.get(k)) for k, v in value.items()}
    if isinstance(value, list):
        items = [_like(v, template[i] if isinstance(template, (list, tuple))
                       and i < len(template) else None) for i, v in enumerate(value)]
        return tuple(items) if isinstance(template, tuple) else items
    return value


def train_batches(data_cfg: Mapping[str, Any], tokenizer: Tokenizer,
                  sharding: NamedSharding) -> GlobalBatches:
    """Shuffled, repeated (data.num_epochs) training batches of data.batch_size rows."""
    return GlobalBatches(
        local_batches(data_cfg, tokenizer, data_cfg["train_split"],
                      local_batch=_local_batch(data_cfg["batch_size"]), shuffle=True,
                      num_epochs=data_cfg["num_epochs"] or None,
                      process_index=jax.process_index(), process_count=jax.process_count()),
        sharding, data_cfg["batch_size"])


def eval_batches(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, sharding: NamedSharding,
                 split: str | None = None) -> GlobalBatches:
    """The evaluation split in a fixed order, cycled so every process yields the same count."""
    return GlobalBatches(
        local_batches(data_cfg, tokenizer, split or data_cfg["eval_split"],
                      local_batch=_local_batch(data_cfg["batch_size"]), shuffle=False,
                      num_epochs=None, process_index=jax.process_index(),
                      process_count=jax.process_count()),
        sharding, data_cfg["batch_size"])


def _local_batch(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise DataError(f"data.batch_size={global_batch} is not divisible by the "
                        f"{jax.process_count()} processes")
    return global_batch // jax.process_count()
