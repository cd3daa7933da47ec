"""Document cleaning before tokenization: text normalisation, then length and duplicate filters.

Normalisation (Unicode form, control characters, whitespace) is a pure per-document function
applied as documents are read. The filters need a whole pass over a split (a duplicate is only
known once the first copy was seen), so their result, the indices of the kept documents and the
counts of what was dropped, is computed once per (dataset, split, cleaning settings) and cached
next to the prepared data. Every drop is counted and reported; a split that cleaning empties is
an error, never a silently empty dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import unicodedata
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from configs.base import get_config as base_config
from errors import DataError

NORMAL_FORMS = ("", "NFC", "NFKC", "NFD", "NFKD")
# C0/C1 control characters except tab and line feed, DEL, and the byte-order mark.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_ASCII_CONTROL = bytes([*range(0, 9), *range(11, 32), 127])
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
DROP_REASONS = ("empty", "too_short", "too_long", "duplicate")
_READ_BLOCK = 1024
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    """The `data.clean` section (configs/base.py states each key's default and meaning)."""
    normalize: str
    strip_control: bool
    collapse_whitespace: bool
    min_chars: int
    max_chars: int
    dedup: bool

    @classmethod
    def create(cls, **changes: Any) -> "CleanConfig":
        """configs/base.py's `data.clean` with `changes`, checked."""
        return cls.from_mapping({**base_config().data.clean.to_dict(), **changes})

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "CleanConfig":
        cfg = cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})
        if cfg.normalize not in NORMAL_FORMS:
            raise DataError(f"data.clean.normalize={cfg.normalize!r}: choose one of "
                            f"{NORMAL_FORMS} ('' = leave the text as it is)")
        for key in ("min_chars", "max_chars"):
            if getattr(cfg, key) < 0:
                raise DataError(f"data.clean.{key} must be >= 0 (max_chars: 0 = no limit), got "
                                f"{getattr(cfg, key)}")
        if cfg.max_chars and cfg.max_chars < cfg.min_chars:
            raise DataError(f"data.clean.max_chars={cfg.max_chars} is below "
                            f"min_chars={cfg.min_chars}: every document would be dropped")
        return cfg

    @property
    def filters(self) -> bool:
        """Whether any document can be dropped (and a pass over the split is needed)."""
        return bool(self.min_chars or self.max_chars or self.dedup)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(repr(dataclasses.astuple(self)).encode()).hexdigest()[:12]

    def text(self, text: str) -> str:
        """The cleaned text of one document."""
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        if self.strip_control:
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            text = _strip_control(text)
        if self.collapse_whitespace:
            text = _SPACES.sub(" ", text)
            text = _BLANK_LINES.sub("\n\n", _TRAILING.sub("\n", text)).strip()
        return text


def _strip_control(text: str) -> str:
    if text.isascii():     # the common case, ~4x faster through bytes.translate than a regex
        raw = text.encode("ascii")
        kept = raw.translate(None, _ASCII_CONTROL)
        return text if len(kept) == len(raw) else kept.decode("ascii")
    return _CONTROL.sub("", text)


@dataclasses.dataclass
class Kept:
    """The documents of a split that survive the filters, and what was dropped."""
    indices: np.ndarray                     # int64 indices into the split, ascending
    counts: dict[str, int]                  # documents, kept, and one count per DROP_REASONS

    def report(self, name: str) -> str:
        dropped = ", ".join(f"{self.counts[r]} {r.replace('_', ' ')}" for r in DROP_REASONS
                            if self.counts[r])
        return (f"{name}: {self.counts['kept']} of {self.counts['documents']} documents kept"
                + (f" (dropped: {dropped})" if dropped else ""))


def drop_reason(text: str, cfg: CleanConfig) -> str | None:
    """Why a cleaned document is dropped by the length filters, or None."""
    if cfg.min_chars and not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return "too_long"
    return None


def filter_documents(texts: Iterable[str], cfg: CleanConfig) -> Kept:
    """One pass: the indices of the documents that pass the length filters and are the first
    copy of their (cleaned) content, with counts of each reason for a drop."""
    counts = dict.fromkeys(("documents", "kept") + DROP_REASONS, 0)
    candidates, hashes = [], []
    for i, text in enumerate(texts):
        counts["documents"] += 1
        text = cfg.text(text)
        reason = drop_reason(text, cfg)
        if reason:
            counts[reason] += 1
            continue
        candidates.append(i)
        if cfg.dedup:   # 64-bit content hashes: memory stays at 8 bytes a document
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8)
            hashes.append(int.from_bytes(digest.digest(), "little"))
    indices = np.asarray(candidates, np.int64)
    if cfg.dedup and len(indices):
        _, first = np.unique(np.asarray(hashes, np.uint64), return_index=True)
        counts["duplicate"] = len(indices) - len(first)
        indices = indices[np.sort(first)]
    counts["kept"] = len(indices)
    return Kept(indices, counts)


def kept_documents(read: Callable[[Sequence[int]], list[str]], size: int, cfg: CleanConfig,
                   cache_dir: epath.Path | None, name: str) -> Kept:
    """`filter_documents` over `size` documents fetched in blocks by `read(indices)`, cached in
    `cache_dir` (if given and writable) under the cleaning settings' fingerprint."""
    if not cfg.filters:
        return Kept(np.arange(size, dtype=np.int64),
                    dict.fromkeys(("documents", "kept"), size) | dict.fromkeys(DROP_REASONS, 0))
    cache = cache_dir / f"kept-{cfg.fingerprint}-{size}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        with cache.open("rb") as f:
            saved = np.load(f)
            return Kept(saved["indices"], json.loads(str(saved["counts"])))
    if size > 100_000:
        log.info("%s: cleaning pass over %d documents (once; cached in %s)", name, size,
                 cache_dir)

    def texts():
        for start in range(0, size, _READ_BLOCK):
            yield from read(range(start, min(start + _READ_BLOCK, size)))

    kept = filter_documents(texts(), cfg)
    if kept.counts["kept"] < size:   # reported by the pass that found it; a cache hit is silent
        log.info("%s", kept.report(name))
    if cache is not None:
        _save(cache, kept)
    return kept


def _save(cache: epath.Path, kept: Kept) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.parent / f"{cache.name}.tmp-{np.random.randint(1 << 30)}"
        with tmp.open("wb") as f:
            np.savez(f, indices=kept.indices, counts=json.dumps(kept.counts))
        tmp.rename(cache)
    except OSError as e:   # a read-only dataset directory: recompute next time
        log.warning("cannot cache the cleaning result in %s (%s)", cache.parent, e)


def check_not_empty(kept: Kept, name: str) -> None:
    """A split that cleaning emptied is an error that says why."""
    if kept.counts["kept"] == 0:
        if kept.counts["documents"] == 0:
            raise DataError(f"{name} has no documents")
        raise DataError(f"{kept.report(name)}: nothing is left to train on; check the data or "
                        "relax data.clean (min_chars, max_chars)")
