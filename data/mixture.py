"""Which document sources a config reads, and in what proportions.

`data.mixture` lists (spec, weight) pairs; a spec is `python_stdlib`, `text_files:<glob>` or
`tfds:<name>` (e.g. `tfds:c4/en:3.1.0`). Empty, the single source of `data.source` is read.
Sources are mixed document by document with grain's index-based `MapDataset.mix`, so a mixture
is as deterministic (and resumable) as one source: document k of the mixture is always the same.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import grain

from errors import DataError

KINDS = ("python_stdlib", "text_files", "tfds", "task_files", "stdlib_task")
# labelled task sources (data/tasks.py): one JSON record per document
TASK_KINDS = ("task_files", "stdlib_task")


@dataclasses.dataclass(frozen=True)
class Source:
    """One document source: a local corpus (prepared by Loom) or a prepared tfds dataset."""
    kind: str
    paths: tuple[str, ...] = ()
    tfds_name: str = ""
    text_field: str = "text"
    weight: float = 1.0
    eval_paths: tuple[str, ...] = ()     # task_files: explicit validation files
    derived: str = ""                    # stdlib_task: which derived task

    @property
    def name(self) -> str:
        if self.kind == "tfds":
            return f"tfds:{self.tfds_name}"
        if self.kind == "stdlib_task":
            return f"stdlib_task:{self.derived}"
        return self.kind if self.kind == "python_stdlib" else \
            f"{self.kind}:{','.join(self.paths)}"


def parse_spec(spec: str, weight: float, text_field: str) -> Source:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise DataError(f"data.mixture source {spec!r}: start it with one of {KINDS}, e.g. "
                        "'text_files:docs/*.txt' or 'tfds:lm1b'")
    if kind != "python_stdlib" and not arg:
        raise DataError(f"data.mixture source {spec!r} needs a "
                        f"{'glob' if kind == 'text_files' else 'dataset name'} after '{kind}:'")
    if not (weight > 0 and math.isfinite(weight)):
        raise DataError(f"data.mixture weight of {spec!r} must be positive and finite, got "
                        f"{weight}")
    return Source(kind=kind, paths=(arg,) if kind == "text_files" else (),
                  tfds_name=arg if kind == "tfds" else "", text_field=text_field,
                  weight=float(weight))


def sources(data_cfg: Mapping[str, Any]) -> list[Source]:
    """The sources of a `data` section: its mixture, or its single source."""
    mixture, paths = data_cfg["mixture"], data_cfg["paths"]
    if not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"data.paths={tuple(paths)!r}: each entry is a glob of text files, "
                        "e.g. --config.data.paths='docs/*.txt,notes/*.md'")
    if not mixture:
        if data_cfg["source"] not in KINDS:
            raise DataError(f"data.source={data_cfg['source']!r}: choose one of {KINDS}")
        if data_cfg["source"] in ("text_files", "task_files") and not paths:
            raise DataError(f"data.source={data_cfg['source']} needs data.paths (globs of "
                            "files), e.g. --config.data.paths='docs/*.txt'")
        if data_cfg["source"] == "tfds" and not data_cfg["tfds_name"]:
            raise DataError("data.source=tfds needs data.tfds_name, e.g. "
                            "--config.data.tfds_name=lm1b (or c4/en:3.1.0)")
        task = data_cfg.get("task") or {}
        return [Source(kind=data_cfg["source"], paths=tuple(paths),
                       tfds_name=data_cfg["tfds_name"], text_field=data_cfg["text_field"],
                       eval_paths=tuple(data_cfg.get("eval_paths", ())),
                       derived=task.get("derived", "") if data_cfg["source"] == "stdlib_task"
                       else "")]
    parsed = []
    for entry in mixture:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2
                and isinstance(entry[0], str) and isinstance(entry[1], (int, float))
                and not isinstance(entry[1], bool)):
            raise DataError(f"data.mixture entry {entry!r}: use (spec, weight), e.g. "
                            "(('tfds:lm1b', 0.7), ('text_files:docs/*.txt', 0.3))")
        parsed.append(parse_spec(entry[0], entry[1], data_cfg["text_field"]))
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise DataError(f"data.mixture names a source twice: {names}")
    return parsed


def mix(datasets: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
    """Documents of `datasets` interleaved in proportion to `weights` (deterministically)."""
    if len(datasets) == 1:
        return datasets[0]
    return grain.MapDataset.mix(list(datasets), [float(w) for w in weights])
