"""A tensorflow-datasets builder over local documents, prepared once to ArrayRecord.

Reading goes through `tfds` data sources (random access, no TensorFlow), which grain consumes.
The builder config name is a fingerprint of the inputs, so a changed corpus is prepared anew
instead of silently reusing stale records.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Mapping, Sequence

import tensorflow_datasets as tfds

from data import sources
from data.sources import DataError

SPLITS = ("train", "validation")


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
    source: str = "python_stdlib"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    validation_percent: float = 2.0
    max_docs: int = 0


class LocalCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents from `data.sources`, split into train/validation by a hash of each key."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local documents, split by key hash."}
    BUILDER_CONFIGS = [CorpusConfig(name="default")]

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
        for i, (key, text) in enumerate(_documents(cfg)):
            if cfg.max_docs and i >= cfg.max_docs:
                break
            if in_validation(key, cfg.validation_percent) == (split == "validation"):
                yield key, {"key": key, "text": text}


def in_validation(key: str, percent: float) -> bool:
    """Deterministic document-level split: a key's hash decides, independent of file order."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 10_000
    return bucket < percent * 100


def _documents(cfg: CorpusConfig):
    if cfg.source == "python_stdlib":
        return sources.python_stdlib()
    return sources.text_files(cfg.paths, cfg.text_field)


def corpus_config(data_cfg: Mapping[str, Any]) -> CorpusConfig:
    """The builder config for a local `data` section, named by a fingerprint of its inputs."""
    source = data_cfg["source"]
    paths = tuple(data_cfg["paths"])
    if source == "python_stdlib":
        fingerprint = sources.python_stdlib_fingerprint()
    else:
        if not paths:
            raise DataError("data.source=text_files needs data.paths (globs of text files)")
        if not sources.expand(paths):
            raise DataError(f"data.paths {list(paths)} match no files; check the paths or globs")
        fingerprint = sources.files_fingerprint(paths)
    spec = (source, paths, data_cfg["text_field"], float(data_cfg["validation_percent"]),
            int(data_cfg["max_docs"]), fingerprint)
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    return CorpusConfig(name=f"{source}_{digest}", source=source, paths=paths,
                        text_field=data_cfg["text_field"],
                        validation_percent=float(data_cfg["validation_percent"]),
                        max_docs=int(data_cfg["max_docs"]))


def data_dir(data_cfg: Mapping[str, Any]) -> str | None:
    return os.path.expanduser(data_cfg["data_dir"]) if data_cfg["data_dir"] else None


def prepare(data_cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
    """The prepared builder for `data_cfg` (a local corpus or a tfds dataset already prepared)."""
    tfds.disable_progress_bar()
    if data_cfg["source"] == "tfds":
        return _prepared_tfds(data_cfg)
    builder = LocalCorpus(config=corpus_config(data_cfg), data_dir=data_dir(data_cfg),
                          file_format="array_record")
    if not builder.is_prepared():
        logging.info("preparing %s in %s", builder.builder_config.name, builder.data_dir)
        builder.download_and_prepare()
    for split in SPLITS:
        if builder.info.splits[split].num_examples == 0:
            raise DataError(
                f"the {split} split of {builder.builder_config.name} is empty; the corpus needs "
                f"more documents, or a different data.validation_percent")
    return builder


def _prepared_tfds(data_cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
    name = data_cfg["tfds_name"]
    if not name:
        raise DataError("data.source=tfds needs data.tfds_name (e.g. lm1b, c4/en:3.1.0)")
    try:
        builder = tfds.builder(name, data_dir=data_dir(data_cfg))
    except Exception as e:  # tfds raises several types for unknown names
        raise DataError(f"tfds dataset {name!r} cannot be loaded: {e}") from None
    if not builder.is_prepared():
        raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; prepare it "
                        "there first (Loom never downloads at run time) or set data.data_dir")
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str, text_field: str) -> Sequence:
    """Random-access source of one split, read from ArrayRecord without TensorFlow."""
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:
        raise DataError(f"split {split!r} of {builder.name}: {e}") from None
    features = builder.info.features
    if text_field not in features:
        raise DataError(f"{builder.name} has no feature {text_field!r} (data.text_field); its "
                        f"features are {sorted(features.keys())}")
    return source
