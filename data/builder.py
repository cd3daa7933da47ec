"""A tensorflow-datasets builder over local documents, prepared once to ArrayRecord, and reading
any prepared tfds split as cleaned text.

Reading goes through `tfds` data sources (random access, no TensorFlow), which grain consumes.
The builder config name is a fingerprint of the inputs, so a changed corpus is prepared anew
instead of silently reusing stale records.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

from data import cleaning, derived, sources
from data.mixture import Source
from errors import DataError

SPLITS = ("train", "validation")
TASK_RECORDS_VERSION = 1   # bump when data/derived.py or sources.task_files change their records
log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
    source: str = "python_stdlib"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    validation_percent: float = 2.0
    max_docs: int = 0
    eval_paths: tuple[str, ...] = ()   # task_files: the validation split is these files
    derived: str = ""                  # stdlib_task: data/derived.py's task


class LocalCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents from `data.sources`, split into train/validation by a hash of their content."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Local documents, split by key hash.",
                     "1.1.0": "Split by content hash; empty documents kept (cleaning drops them).",
                     "1.2.0": "text_files documents keyed relative to their directory, so the "
                              "record order does not depend on where the files live."}
    BUILDER_CONFIGS = [CorpusConfig(name="default")]

    # tfds prints "Downloading and preparing dataset ..." and "... downloaded and prepared"
    # (termcolor, not logging) around every preparation; nothing is downloaded here, and
    # `prepare` logs "preparing <name> in <dir>" itself.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text documents (see data/sources.py).",
            features=tfds.features.FeaturesDict({"key": tfds.features.Text(),
                                                 "text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        cfg: CorpusConfig = self.builder_config
        if cfg.eval_paths:   # explicit evaluation files: no split by hash
            paths = cfg.eval_paths if split == "validation" else cfg.paths
            for key, text in sources.task_files(paths):
                yield key, {"key": key, "text": text}
            return
        for i, (key, text) in enumerate(_documents(cfg)):
            if cfg.max_docs and i >= cfg.max_docs:
                break
            # blank documents (dropped later by cleaning, and counted) split by name instead
            basis = text if text.strip() else key
            if in_validation(basis, cfg.validation_percent) == (split == "validation"):
                yield key, {"key": key, "text": text}


def in_validation(text: str, percent: float) -> bool:
    """Deterministic document-level split by content (whitespace-insensitive), so copies of a
    document always land in the same split and never leak from train into validation."""
    canonical = " ".join(text.split()).encode("utf-8", "surrogatepass")
    bucket = int.from_bytes(hashlib.sha256(canonical).digest()[:8], "little") % 10_000
    return bucket < percent * 100


def _documents(cfg: CorpusConfig):
    if cfg.source == "python_stdlib":
        return sources.python_stdlib()
    if cfg.source == "stdlib_task":
        return derived.documents(cfg.derived)
    if cfg.source == "task_files":
        return sources.task_files(cfg.paths)
    return sources.text_files(cfg.paths, cfg.text_field)


def corpus_config(source: Source, data_cfg: Mapping[str, Any]) -> CorpusConfig:
    """The builder config of a local source, named by a fingerprint of its inputs."""
    if source.kind in ("python_stdlib", "stdlib_task"):
        fingerprint = sources.python_stdlib_fingerprint()
    else:
        if not sources.expand(source.paths):
            raise DataError(f"data.paths {list(source.paths)} match no files; check the paths "
                            "or globs")
        fingerprint = sources.files_fingerprint(source.paths)
        if source.eval_paths:
            if not sources.expand(source.eval_paths):
                raise DataError(f"data.eval_paths {list(source.eval_paths)} match no files; "
                                "check the paths or globs")
            fingerprint += sources.files_fingerprint(source.eval_paths)
    spec = (source.kind, source.paths, source.text_field,
            float(data_cfg["validation_percent"]), int(data_cfg["max_docs"]), fingerprint)
    if source.kind in ("task_files", "stdlib_task"):
        spec += (source.eval_paths, source.derived, TASK_RECORDS_VERSION)
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    return CorpusConfig(name=f"{source.kind}_{digest}", source=source.kind, paths=source.paths,
                        text_field=source.text_field, eval_paths=source.eval_paths,
                        derived=source.derived,
                        validation_percent=float(data_cfg["validation_percent"]),
                        max_docs=int(data_cfg["max_docs"]))


def data_dir(data_cfg: Mapping[str, Any]) -> str | None:
    return os.path.expanduser(data_cfg["data_dir"]) if data_cfg["data_dir"] else None


def prepare(source: Source, data_cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
    """The prepared builder of `source` (a local corpus, prepared here on first use, or a tfds
    dataset already prepared in data.data_dir)."""
    tfds.disable_progress_bar()
    if source.kind == "tfds":
        return prepared_tfds(source.tfds_name, data_dir(data_cfg))
    builder = LocalCorpus(config=corpus_config(source, data_cfg), data_dir=data_dir(data_cfg),
                          file_format="array_record")
    if not builder.is_prepared():
        log.info("preparing %s in %s", builder.builder_config.name, builder.data_dir)
        try:
            builder.download_and_prepare()
        except AssertionError as e:   # tfds refuses to write a split without examples
            raise DataError(f"{source.name}: {e}; the corpus needs more documents, or a "
                            "different data.validation_percent") from e
        except FileExistsError:
            # Another process (a parallel sweep trial, another host on a shared disk) prepared
            # it at the same time and renamed its copy into place first; that one is complete.
            builder = LocalCorpus(config=corpus_config(source, data_cfg),
                                  data_dir=data_dir(data_cfg), file_format="array_record")
            if not builder.is_prepared():
                raise
    for split in SPLITS:
        if builder.info.splits[split].num_examples == 0:
            raise DataError(
                f"the {split} split of {source.name} is empty; the corpus needs more documents, "
                "or a different data.validation_percent")
    return builder


def prepared_tfds(name: str, directory: str | None) -> tfds.core.DatasetBuilder:
    """A tfds dataset already prepared in `directory` (Loom never downloads at run time)."""
    if not name:
        raise DataError("data.source=tfds needs data.tfds_name (e.g. lm1b, c4/en:3.1.0)")
    try:
        builder = tfds.builder(name, data_dir=directory)
    except (ValueError, KeyError, OSError) as e:  # unknown or malformed names, unreadable dirs
        raise DataError(f"tfds dataset {name!r} cannot be loaded: {e}") from e
    if not builder.is_prepared():
        raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; prepare it "
                        "there first (Loom never downloads at run time) or set data.data_dir")
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str, text_field: str) -> Sequence:
    """Random-access source of one split, read from ArrayRecord without TensorFlow."""
    features = builder.info.features
    if text_field not in features:
        raise DataError(f"{builder.name} has no feature {text_field!r} (data.text_field); its "
                        f"features are {sorted(features.keys())}")
    try:
        return builder.as_data_source(split=split)
    except (ValueError, KeyError, OSError) as e:   # unknown split names, split syntax, files
        raise DataError(f"split {split!r} of {builder.name}: {e}") from e


def as_text(record: Mapping[str, Any], field: str) -> str:
    value = record[field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class CleanTexts:
    """Random-access cleaned texts of the kept records of a split; picklable, since grain's
    workers receive the pipeline by pickle.

    A `Text` feature is read straight from the record's tf.Example proto: tfds' general
    deserialisation costs more than cleaning the text.
    """
    records: Any     # a tfds ArrayRecord data source
    indices: np.ndarray
    field: str
    clean: cleaning.CleanConfig
    plain_text: bool

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        index = int(self.indices[i])
        if self.plain_text:
            record = tf_example_pb2.Example.FromString(self.records.data_source[index])
            text = record.features.feature[self.field].bytes_list.value[0].decode(
                "utf-8", errors="replace")
        else:
            text = as_text(self.records[index], self.field)
        return self.clean.text(text)


def read_split(source: Source, data_cfg: Mapping[str, Any], split: str,
               clean: cleaning.CleanConfig) -> tuple[grain.MapDataset, cleaning.Kept]:
    """The split's cleaned documents (random access, storage order) and what cleaning dropped;
    drops are reported, and a split with nothing left is an error."""
    prepared = prepare(source, data_cfg)
    records = data_source(prepared, split, source.text_field)
    name = f"{source.name} [{split}]"
    slug = hashlib.sha256(f"{prepared.info.full_name}:{split}".encode()).hexdigest()[:12]

    def read(indices: Sequence[int]) -> list[str]:
        return [as_text(r, source.text_field) for r in records.__getitems__(list(indices))]

    cache = epath.Path(prepared.data_dir) / "loom_clean" / slug
    kept = cleaning.kept_documents(read, len(records), clean, cache, name)
    cleaning.check_not_empty(kept, name)
    plain = isinstance(prepared.info.features[source.text_field], tfds.features.Text) and \
        hasattr(records, "data_source")
    texts = grain.MapDataset.source(CleanTexts(records, kept.indices, source.text_field, clean,
                                               plain))
    return texts, kept


def tfds_texts(name: str, split: str, text_field: str, directory: str | None,
               seed: int = 0) -> Iterator[str]:
    """The texts of a prepared tfds split in a seeded random order (a tokenizer's sample)."""
    records = data_source(prepared_tfds(name, directory), split, text_field)
    order = grain.MapDataset.range(len(records)).shuffle(seed=seed)
    return (as_text(records[int(i)], text_field) for i in order)
