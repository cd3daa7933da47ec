"""Assembles the data pipeline for a config: sources -> clean -> documents -> objective's
examples -> rows -> batches -> global jax.Arrays.

Each process reads its own slice of every source's documents and builds its slice of the global
batch; `jax.make_array_from_process_local_data` joins the slices into one sharded array. Every
random choice is seeded by a document's place in the stream, and the grain iterator's state goes
into every checkpoint, so a resumed run sees exactly the batches an uninterrupted one would have.
The rows of each objective follow the batch layouts in train/objectives.py; `ROWS` is the one
place that picks them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from data import builder as builder_lib
from data import config as data_config
from data import masking, mixture, noise, packing, plm, shuffling, span_corruption, tasks
from data import tokenizer as tokenizer_lib
from data.cleaning import CleanConfig
from data.interleave import InterleaveExamples
from data.packing import Doc
from data.tokenizer import Tokenizer
from errors import DataError
from model.sharding import wait_for_all_processes

log = logging.getLogger(__name__)


def _split_documents(data_cfg: Mapping[str, Any], split: str) -> list[grain.MapDataset]:
    clean = CleanConfig.from_mapping(data_cfg["clean"])
    return [builder_lib.read_split(source, data_cfg, split, clean)[0]
            for source in mixture.sources(data_cfg)]


def documents(data_cfg: Mapping[str, Any], split: str) -> grain.MapDataset:
    """The split's cleaned documents as text (every source, mixed by weight; random access)."""
    weights = [s.weight for s in mixture.sources(data_cfg)]
    return mixture.mix(_split_documents(data_cfg, split), weights)


@dataclasses.dataclass(frozen=True)
class _Tag:
    """(index in a source's stream, text) -> Doc with its epoch and seed."""
    seed: int
    source: int
    per_epoch: int

    def __call__(self, index: int, text: str) -> Doc:
        return Doc(text, index // self.per_epoch, (self.seed, self.source, int(index)))


def document_stream(data_cfg: Mapping[str, Any], split: str, *, shuffle: bool,
                    num_epochs: int | None, process_index: int = 0,
                    process_count: int = 1) -> tuple[grain.MapDataset, grain.MapDataset]:
    """This process's documents as `Doc`s (shuffled anew each epoch if `shuffle`, repeated
    `num_epochs` times or forever, sources mixed by weight), and its unshuffled documents (for
    picking random partner documents)."""
    sources = mixture.sources(data_cfg)
    streams, shards = [], []
    for i, (source, docs) in enumerate(zip(sources, _split_documents(data_cfg, split))):
        if len(docs) < process_count:
            raise DataError(f"{source.name} [{split}] has {len(docs)} documents, fewer than the "
                            f"{process_count} processes that must each read a share")
        shard = docs[process_index::process_count]
        stream = shuffling.shuffle_documents(shard, data_cfg["shuffle_seed"] + i) if shuffle \
            else shard
        streams.append(stream.repeat(num_epochs).map_with_index(
            _Tag(data_cfg["shuffle_seed"], i, len(shard))))
        shards.append(shard)
    weights = [s.weight for s in sources]
    return mixture.mix(streams, weights), mixture.mix(shards, weights)


@dataclasses.dataclass(frozen=True)
class _Partner:
    """A random document's text, other than `exclude` when the shard has another one."""
    docs: grain.MapDataset

    def __call__(self, rng: np.random.Generator, exclude: str) -> str:
        for _ in range(8):
            text = self.docs[int(rng.integers(len(self.docs)))]
            if text != exclude:
                return text
        return text


def _clm_rows(docs, partners, tokenizer, data_cfg, cycle_length):
    seq_len = data_cfg["seq_len"]
    pieces = InterleaveExamples(docs, packing.ClmExamples(tokenizer, seq_len), cycle_length)
    return packing.clm_rows(pieces, seq_len, packing=data_cfg["packing"])


def _mlm_rows(docs, partners, tokenizer, data_cfg, cycle_length):
    cfg = masking.MaskConfig.from_mapping(data_cfg["mlm"])
    seq_len = data_cfg["seq_len"]
    make = masking.MlmExamples(tokenizer, masking.Vocab.of(tokenizer), cfg, seq_len,
                               _Partner(partners))
    return masking.mlm_rows(InterleaveExamples(docs, make, cycle_length), seq_len,
                            packing_rows=data_cfg["packing"], pairs=cfg.sentence_pairs != "none")


def _span_corruption_rows(docs, partners, tokenizer, data_cfg, cycle_length):
    cfg = span_corruption.SpanConfig.from_mapping(data_cfg["spans"])
    chunk_len, _ = span_corruption.chunk_and_target_lengths(data_cfg["seq_len"], cfg)
    make = span_corruption.SpanCorruptionExamples(
        tokenizer, cfg, chunk_len, span_corruption.sentinel_ids(tokenizer, chunk_len, cfg))
    return span_corruption.encoder_decoder_rows(
        InterleaveExamples(docs, make, cycle_length), data_cfg["seq_len"],
        data_config.target_length(data_cfg, "span_corruption"), packing_rows=data_cfg["packing"])


def _prefix_lm_rows(docs, partners, tokenizer, data_cfg, cycle_length):
    seq_len, target_len = data_cfg["seq_len"], data_config.target_length(data_cfg, "prefix_lm")
    make = span_corruption.PrefixLmExamples(tokenizer, seq_len, target_len)
    return span_corruption.encoder_decoder_rows(
        InterleaveExamples(docs, make, cycle_length), seq_len, target_len,
        packing_rows=data_cfg["packing"])


def _denoise_rows(docs, partners, tokenizer, data_cfg, cycle_length):
    seq_len, target_len = data_cfg["seq_len"], data_config.target_length(data_cfg, "denoise")
    make = noise.DenoiseExamples(tokenizer, noise.NoiseConfig.from_mapping(data_cfg["noise"]),
                                 seq_len, target_len)
    return span_corruption.encoder_decoder_rows(
        InterleaveExamples(docs, make, cycle_length), seq_len, target_len,
        packing_rows=data_cfg["packing"])
def _plm_rows(docs, partners, tokenizer, data_cfg, cycle_length):
    cfg, seq_len = plm.PlmConfig.from_mapping(data_cfg["plm"]), data_cfg["seq_len"]
    make = plm.PlmExamples(tokenizer, seq_len)
    return plm.plm_rows(InterleaveExamples(docs, make, cycle_length), seq_len,
                        cfg.predict_ratio, packing_rows=data_cfg["packing"])


def _task_rows(task):
    def rows(docs, partners, tokenizer, data_cfg, cycle_length):
        return docs.map(tasks.task_rows(task, tokenizer, data_cfg)).to_iter_dataset()
    return rows


# objective -> (its documents, partner documents, tokenizer, data config, interleave) -> rows
ROWS: dict[str, Callable[..., grain.IterDataset]] = {
    "clm": _clm_rows,
    "mlm": _mlm_rows,
    "electra": _mlm_rows,     # the generator's masked inputs; the objective does the rest
    "span_corruption": _span_corruption_rows,
    "prefix_lm": _prefix_lm_rows,
    "denoise": _denoise_rows,       # BART: noised text in, the text out (data/noise.py)
    "plm": _plm_rows,         # XLNet: factorisation orders and prediction slots (data/plm.py)
    **{task: _task_rows(task) for task in tasks.TASKS},   # labelled tasks: one example a row
}


def task_records(data_cfg: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Every record of a labelled task's split (cleaned, in storage order), parsed."""
    return [tasks.parse(text) for text in documents(data_cfg, split)]


def local_batches(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, split: str, *,
                  objective: str = "clm", local_batch: int, shuffle: bool,
                  num_epochs: int | None, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """This process's batches of `objective` rows: numpy dicts of [local_batch, ...] in the
    layout of train/objectives.py, plus `epoch` [local_batch] (the pass each row came from)."""
    if objective not in ROWS:
        raise DataError(f"objective {objective!r} has no data pipeline; choose one of "
                        f"{sorted(ROWS)}")
    docs, partners = document_stream(data_cfg, split, shuffle=shuffle, num_epochs=num_epochs,
                                     process_index=process_index, process_count=process_count)
    rows = ROWS[objective](docs, partners, tokenizer, data_cfg,
                           data_cfg["interleave"] if shuffle else 1)
    if shuffle and data_cfg["shuffle_window"] > 1:
        rows = shuffling.WindowShuffle(rows, window_size=data_cfg["shuffle_window"],
                                       seed=data_cfg["shuffle_seed"])
    batches = rows.batch(local_batch, drop_remainder=True)
    if data_cfg["worker_count"] > 0 and shuffle:
        if not flags.FLAGS.is_parsed():   # grain's workers read absl flags; Loom uses argparse
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg["worker_count"]))
    return batches


class GlobalBatches:
    """Iterator of global, sharded batches over a checkpointable grain iterator.

    `epoch` is the pass over the data that the latest batch came from (0 = the first).
    `get_state`/`set_state` speak JSON bytes, which is how grain's orbax handler stores
    iterators that are not grain's own; `set_state` restores the tuples JSON turned into lists
    (grain's packing state compares them as tuples and resumes wrongly otherwise).
    """

    def __init__(self, batches: grain.IterDataset, sharding: NamedSharding, global_batch: int):
        self.grain_iterator = iter(batches)
        self.sharding = sharding
        self.global_batch = global_batch
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = dict(next(self.grain_iterator))
        self.epoch = int(np.max(local.pop("epoch")))
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


def train_batches(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, sharding: NamedSharding,
                  objective: str = "clm") -> GlobalBatches:
    """Shuffled training batches of data.batch_size rows; data.num_epochs passes (0 = forever),
    after which the iterator ends (StopIteration)."""
    return GlobalBatches(
        local_batches(data_cfg, tokenizer, data_cfg["train_split"], objective=objective,
                      local_batch=_local_batch(data_cfg["batch_size"]), shuffle=True,
                      num_epochs=data_cfg["num_epochs"] or None,
                      process_index=jax.process_index(), process_count=jax.process_count()),
        sharding, data_cfg["batch_size"])


def eval_batches(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, sharding: NamedSharding,
                 split: str | None = None, objective: str = "clm") -> GlobalBatches:
    """The evaluation split in a fixed order, cycled so every process yields the same count."""
    return GlobalBatches(
        local_batches(data_cfg, tokenizer, split or data_cfg["eval_split"], objective=objective,
                      local_batch=_local_batch(data_cfg["batch_size"]), shuffle=False,
                      num_epochs=None, process_index=jax.process_index(),
                      process_count=jax.process_count()),
        sharding, data_cfg["batch_size"])


def _local_batch(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise DataError(f"data.batch_size={global_batch} is not divisible by the "
                        f"{jax.process_count()} processes")
    return global_batch // jax.process_count()


def load_or_train_tokenizer(data_cfg: Mapping[str, Any], workdir: str | Path) -> Tokenizer:
    """The run's vocabulary: `workdir/tokenizer.model`, created on the first run.

    It comes from `data.tokenizer.path` or is trained on a sample of the train split. On a later
    run it is re-read from the workdir, and a configured path holding a different vocabulary is an
    error instead of a silent switch.

    With several processes, process 0 first prepares the corpus (tfds builders, cleaning cache)
    and makes the vocabulary; the others wait for it and then read the same files, so hosts
    never race on a shared data_dir or train different vocabularies.
    """
    if jax.process_count() == 1:
        return _load_or_train_tokenizer(data_cfg, workdir)
    if jax.process_index() == 0:
        for split in {data_cfg["train_split"], data_cfg["eval_split"]}:
            documents(data_cfg, split)
        tokenizer = _load_or_train_tokenizer(data_cfg, workdir)
    wait_for_all_processes("loom: corpus prepared and vocabulary saved")
    if jax.process_index() != 0:
        if not (Path(workdir) / tokenizer_lib.MODEL_FILE).exists():
            raise DataError(f"process {jax.process_index()} cannot see {workdir}/"
                            f"{tokenizer_lib.MODEL_FILE}, which process 0 wrote: every host of a "
                            "run needs the same --workdir on a shared filesystem")
        tokenizer = _load_or_train_tokenizer(data_cfg, workdir)
    return tokenizer


def _load_or_train_tokenizer(data_cfg: Mapping[str, Any], workdir: str | Path) -> Tokenizer:
    tok_cfg = data_cfg["tokenizer"]
    run_copy = Path(workdir) / tokenizer_lib.MODEL_FILE
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
        log.info("training a %s tokenizer of %d pieces on the train split",
                 tok_cfg["model_type"], tok_cfg["vocab_size"])
        sample = documents(data_cfg, data_cfg["train_split"]).shuffle(seed=data_cfg["shuffle_seed"])
        tokenizer = tokenizer_lib.train(iter(sample), vocab_size=tok_cfg["vocab_size"],
                                        model_type=tok_cfg["model_type"],
                                        max_chars=tok_cfg["sample_chars"],
                                        character_coverage=tok_cfg["character_coverage"])
    if jax.process_index() == 0:
        tokenizer.save(run_copy)
    return tokenizer
