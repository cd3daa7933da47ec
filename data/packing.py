"""Examples to fixed-length rows: causal-LM pieces, and packing or padding of any examples.

Every row carries segment ids (1, 2, ... per example, 0 for padding) and positions (restarting
at 0 in each example), so a model never attends across examples and a loss never counts padding.
Examples are dicts of 1-D arrays grouped in streams that share a length (one stream for decoder
and encoder models, `encoder_` and `decoder_` for encoder-decoders), plus scalars: `epoch` (the
pass over its source an example came from; a row keeps the largest) and, for sentence pairs,
`pair_labels` / `pair_weights`. Rows come out in the layout of train/objectives.py, plus `epoch`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from data.tokenizer import BOS, EOS, Tokenizer

Example = dict[str, Any]
Streams = Mapping[str, tuple[int, Sequence[str]]]   # prefix -> (row length, its keys)


@dataclasses.dataclass(frozen=True)
class Doc:
    """A document on its way into examples: text, the pass it belongs to, and the seed of every
    random choice made about it (a function of its place in the stream, so resume is exact)."""
    text: str
    epoch: int
    seed: tuple[int, ...]

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def document_pieces(ids: Any, seq_len: int, bos: int, eos: int) -> list[Example]:
    """[BOS] doc [EOS] split into pieces of at most `seq_len` (input, target) pairs.

    Consecutive pieces overlap by one token, so every next-token transition of the document is
    trained on exactly once, and positions stay below `seq_len` for any document length.
    """
    ids = np.concatenate([[bos], np.asarray(ids, np.int32), [eos]]).astype(np.int32)
    pieces = []
    for start in range(0, len(ids) - 1, seq_len):
        end = min(start + seq_len, len(ids) - 1)   # inputs and targets of equal length
        pieces.append({"inputs": ids[start:end], "targets": ids[start + 1:end + 1]})
    return pieces


@dataclasses.dataclass(frozen=True)
class ClmExamples:
    """Doc -> causal-LM pieces (see `document_pieces`), every target weighted 1."""
    tokenizer: Tokenizer
    seq_len: int

    def __call__(self, doc: Doc) -> list[Example]:
        pieces = document_pieces(self.tokenizer.encode_array(doc.text), self.seq_len, BOS, EOS)
        return [p | {"weights": np.ones(len(p["inputs"]), np.float32), "epoch": doc.epoch}
                for p in pieces]


def clm_rows(pieces: grain.IterDataset, seq_len: int, *, packing: bool) -> grain.IterDataset:
    """Causal-LM pieces -> rows of `seq_len`. Packing concatenates pieces and splits at row ends
    (a document may continue in the next row, positions restarting; no padding); otherwise each
    piece is padded."""
    streams = {"": (seq_len, ("inputs", "targets", "weights"))}
    return fit_rows(pieces, streams, packing=packing, split=True)


def pad_example(example: Example, streams: Streams) -> Example:
    """One example as a row: each stream's keys padded with 0 to its length, with segment ids
    (1 on real tokens) and positions; scalars passed through."""
    row = {k: v for k, v in example.items() if np.ndim(v) == 0}
    row["epoch"] = np.int32(example["epoch"])
    for prefix, (length, keys) in streams.items():
        n = len(example[keys[0]])
        if n > length:
            raise ValueError(f"{prefix}{keys[0]} of length {n} does not fit a row of {length}")
        for key in keys:
            row[key] = np.pad(example[key], (0, length - n))
        row[f"{prefix}segment_ids"] = (np.arange(length) < n).astype(np.int32)
        row[f"{prefix}positions"] = np.where(np.arange(length) < n, np.arange(length),
                                             0).astype(np.int32)
    return row


@dataclasses.dataclass(frozen=True)
class _Pad:
    streams: Streams

    def __call__(self, example: Example) -> Example:
        return pad_example(example, self.streams)


def fit_rows(examples: grain.IterDataset, streams: Streams, *, packing: bool,
             split: bool = False) -> grain.IterDataset:
    """Examples -> rows: packed in order (see `PackRows`), or one example per row."""
    if packing:
        return PackRows(examples, streams, split=split)
    return examples.map(_Pad(streams))


class PackRows(grain.IterDataset):
    """Examples -> rows, filled in order: an example joins the open row if every stream has
    room for it; otherwise the row is emitted (padded) and the example starts the next. With
    `split` (one stream; causal LM) an example that does not fit fills the row and continues in
    the next one, so rows have no padding.

    The state is the parent's state before the example that opens the next row (and how much of
    that example earlier rows took), so a restore re-reads at most one row's examples.
    """

    def __init__(self, parent: grain.IterDataset, streams: Streams, *, split: bool = False):
        super().__init__(parent)
        if split and len(streams) != 1:
            raise ValueError("split packing needs a single stream")
        self._streams, self._split = dict(streams), split

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._streams, self._split)

    def __str__(self) -> str:
        return f"PackRows(split={self._split})"


class _PackIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, streams: Streams, split: bool):
        super().__init__(parent)
        self._split = split
        self._layout = [(length, tuple(keys), f"{prefix}segment_ids", f"{prefix}positions")
                        for prefix, (length, keys) in streams.items()]
        longest = max(length for length, *_ in self._layout)
        self._arange = np.arange(longest, dtype=np.int32)
        self._ones = np.ones(longest, np.int32)
        self._arange.flags.writeable = self._ones.flags.writeable = False   # shared by rows
        self._pending: list | None = None      # [parent state before it, example, offset]
        self._exhausted = False

    def _peek(self) -> list | None:
        if self._pending is None and not self._exhausted:
            before = self._parent.get_state()
            try:
                self._pending = [before, next(self._parent), 0]
            except StopIteration:
                self._exhausted = True
        return self._pending

    def __next__(self) -> Example:
        layout, row = self._layout, {}
        fill = [0] * len(layout)
        segment = epoch = 0
        while (pending := self._peek()) is not None:
            _, example, offset = pending
            sizes = [len(example[keys[0]]) - offset for _, keys, _, _ in layout]
            if segment == 0 and offset == 0 and all(
                    n == length for n, (length, *_) in zip(sizes, layout)):
                self._pending = None           # fills the row exactly: no copies
                return self._whole(example)
            if all(n <= length - f for n, (length, *_), f in zip(sizes, layout, fill)):
                take, self._pending = sizes, None
            elif self._split and fill[0] < layout[0][0]:
                take = [layout[0][0] - fill[0]]
                pending[2] = offset + take[0]
            elif segment == 0:
                raise ValueError(f"an example of {sizes} tokens does not fit a row of "
                                 f"{[length for length, *_ in layout]}")
            else:
                break
            segment += 1
            epoch = max(epoch, int(example["epoch"]))
            for j, (length, keys, segment_key, position_key) in enumerate(layout):
                start, n = fill[j], take[j]
                if segment == 1:
                    for key in keys:
                        row[key] = np.zeros(length, example[key].dtype)
                    row[segment_key] = np.zeros(length, np.int32)
                    row[position_key] = np.zeros(length, np.int32)
                for key in keys:
                    row[key][start:start + n] = example[key][offset:offset + n]
                row[segment_key][start:start + n] = segment
                row[position_key][start:start + n] = self._arange[:n]
                fill[j] = start + n
            if all(f == length for f, (length, *_) in zip(fill, layout)):
                break
        if segment == 0:
            raise StopIteration
        row["epoch"] = np.int32(epoch)
        return row

    def _whole(self, example: Example) -> Example:
        row = {"epoch": np.int32(example["epoch"])}
        for length, keys, segment_key, position_key in self._layout:
            row.update({key: example[key] for key in keys})
            row[segment_key], row[position_key] = self._ones[:length], self._arange[:length]
        return row

    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            return {"parent": copy.deepcopy(self._pending[0]), "offset": self._pending[2]}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._exhausted = None, False
        if state["offset"]:
            self._peek()
            self._pending[2] = state["offset"]
