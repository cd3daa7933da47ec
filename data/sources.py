"""Raw documents, as (key, text) pairs, from the places a corpus can live on local disk.

`python_stdlib` is the corpus every machine with Python has offline: the English prose of the
interpreter's `pydoc` topics and the code and docstrings of its standard library.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

from errors import DataError

Document = tuple[str, str]

# Standard-library folders that are data tables, vendored copies or tests rather than prose/code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings",
                "ensurepip", "lib2to3", "pydoc_data", "__pycache__", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_stdlib() -> Iterator[Document]:
    """pydoc topic texts, then every standard-library module's source, in a fixed order."""
    from pydoc_data.topics import topics   # deferred: a large module, read only here
    for name in sorted(topics):
        yield f"pydoc/{name}", topics[name]
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP & set(rel.parts) or rel.parts[0].startswith(("config-", "_sysconfigdata")):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield f"stdlib/{rel.as_posix()}", text


def python_stdlib_fingerprint() -> str:
    """Changes whenever the interpreter (and so the corpus) changes."""
    version = ".".join(map(str, sys.version_info[:3]))
    return f"{version}:{stdlib_dir()}"


def expand(patterns: Sequence[str]) -> list[str]:
    """Files matched by globs or named directly (directories contribute all files below them)."""
    files: set[str] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        for match in glob.glob(pattern, recursive=True):
            if os.path.isdir(match):
                files.update(str(p) for p in Path(match).rglob("*") if p.is_file())
            else:
                files.add(match)
    return sorted(files)


def _named_files(patterns: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(path, name) of each file the patterns match. Documents are named relative to the files'
    common directory, so the names (and the prepared corpus's record order, which tfds derives
    from them) do not depend on where the corpus lives."""
    files = expand(patterns)
    if not files:
        raise DataError(f"data.paths {list(patterns)} match no files; check the paths or globs")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    for name in files:
        yield name, Path(os.path.relpath(os.path.abspath(name), root)).as_posix()


def text_files(patterns: Sequence[str], text_field: str = "text") -> Iterator[Document]:
    """Each plain file is one document; each line of a `.jsonl` file is one, from `text_field`.

    Empty documents are yielded too: cleaning drops them and counts them (data/cleaning.py).
    """
    for name, shown in _named_files(patterns):
        if name.endswith(".jsonl"):
            yield from ((f"{shown}:{i}", text) for i, text in _jsonl(name, text_field))
            continue
        try:
            text = Path(name).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(name, e) from e
        yield shown, text


def _not_utf8(name: str, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{name} is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it "
                     "(e.g. iconv -t UTF-8) or leave it out of data.paths")


def _jsonl(name: str, text_field: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each record of a .jsonl file."""
    for i, record in _jsonl_records(name):
        if text_field not in record:
            raise DataError(f"{name}:{i} has no field {text_field!r} (data.text_field); "
                            f"its fields are {sorted(record)}")
        yield i, str(record[text_field])


def files_fingerprint(patterns: Sequence[str]) -> str:
    """Hash of matched file names, sizes and modification times: changes when the corpus does."""
    h = hashlib.sha256()
    for name in expand(patterns):
        st = os.stat(name)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def task_files(patterns: Sequence[str]) -> Iterator[Document]:
    """Labelled records, one JSON object per document, each with `_where` (file:line) so later
    errors can name it: a `.jsonl` line as it is; a CoNLL file (any other name: `token<TAB or
    space>tag` per line, the tag in the last column, a blank line between sentences) as one
    {"tokens": [...], "tags": [...]} record per sentence."""
    for name, shown in _named_files(patterns):
        records = _jsonl_records(name) if name.endswith(".jsonl") else _conll_records(name)
        for line, record in records:
            record["_where"] = f"{name}:{line}"
            yield f"{shown}:{line}", json.dumps(record, ensure_ascii=False, sort_keys=True)


def _jsonl_records(name: str) -> Iterator[tuple[int, dict]]:
    with open(name, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{i} is not valid UTF-8 ({e.reason} at byte {e.start} "
                                "of the line); re-encode the file") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{i} is not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataError(f"{name}:{i} is a JSON {type(record).__name__}, not an object "
                                "with named fields (one record per line)")
            yield i, record


def _conll_records(name: str) -> Iterator[tuple[int, dict]]:
    try:
        lines = Path(name).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise _not_utf8(name, e) from e
    tokens, tags, start = [], [], 1
    for i, line in enumerate(lines + [""], 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                yield start, {"tokens": tokens, "tags": tags}
            tokens, tags, start = [], [], i + 1
            continue
        columns = line.split()
        if len(columns) < 2:
            raise DataError(f"{name}:{i}: CoNLL line {line.strip()!r} has no tag; write "
                            "'token<TAB>tag' (the tag in the last column), or use a .jsonl "
                            "file of {\"tokens\": [...], \"tags\": [...]}")
        tokens.append(columns[0])
        tags.append(columns[-1])
