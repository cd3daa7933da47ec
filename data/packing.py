"""Examples to fixed-length rows: causal-LM pieces, and packing or padding of any examples.

Every row carries segment ids (1, 2, ... per example, 0 for padding) and positions (restarting
at 0 in each example), so a model never attends across examples and a loss never counts padding.
Every example also carries `epoch` (which pass over its source it came from) as a per-token
feature, which rows reduce to one number per row; `pipeline.GlobalBatches` strips it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from data.tokenizer import BOS, EOS, Tokenizer

Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Doc:
    """A document on its way into examples: text, the pass it belongs to, and the seed of every
    random choice made about it (a function of its place in the stream, so resume is exact)."""
    text: str
    epoch: int
    seed: tuple[int, ...]

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def epochs_like(ids: np.ndarray, epoch: int) -> np.ndarray:
    return np.full(len(ids), epoch, np.int32)


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
    """Doc -> causal-LM pieces (see `document_pieces`)."""
    tokenizer: Tokenizer
    seq_len: int

    def __call__(self, doc: Doc) -> list[Example]:
        pieces = document_pieces(self.tokenizer.encode_array(doc.text), self.seq_len, BOS, EOS)
        return [p | {"epoch": epochs_like(p["inputs"], doc.epoch)} for p in pieces]


def row_epoch(epoch_T: np.ndarray) -> np.ndarray:
    return np.asarray(np.max(epoch_T), np.int32)


def _rename_clm(row: Example) -> Example:
    segment_ids = row["inputs_segment_ids"]
    return {"inputs": row["inputs"].astype(np.int32), "targets": row["targets"].astype(np.int32),
            "segment_ids": segment_ids, "positions": row["inputs_positions"],
            "weights": (segment_ids != 0).astype(np.float32), "epoch": row_epoch(row["epoch"])}


def clm_rows(pieces: grain.IterDataset, seq_len: int, *, packing: bool) -> grain.IterDataset:
    """Causal-LM pieces -> rows of `seq_len`. Packing concatenates pieces and splits at row ends
    (a document may continue in the next row, no padding); otherwise each piece is padded."""
    if packing:
        lengths = {"inputs": seq_len, "targets": seq_len, "epoch": seq_len}
        packed = ConcatThenSplitIterDataset(pieces, length_struct=lengths)  # splits all keys
        return packed.map(_rename_clm)
    return fit_rows(pieces, lengths={"inputs": seq_len, "targets": seq_len, "epoch": seq_len},
                    primary=("inputs",), packing=False).map(_rename_clm)


def pad_example(example: Example, lengths: Mapping[str, int],
                primary: Sequence[str]) -> Example:
    """One example as a row: features padded with 0 to their length; segment ids (1 on real
    tokens) and positions for each `primary` feature; other keys (scalars) passed through."""
    row = {}
    for key, value in example.items():
        if key not in lengths:
            row[key] = value
            continue
        n, size = len(value), lengths[key]
        if n > size:
            raise ValueError(f"{key} of length {n} does not fit a row of {size}")
        row[key] = np.pad(value, (0, size - n))
        if key in primary:
            real = np.arange(size) < n
            row[f"{key}_segment_ids"] = real.astype(np.int32)
            row[f"{key}_positions"] = np.where(real, np.arange(size), 0).astype(np.int32)
    return row


@dataclasses.dataclass(frozen=True)
class _Pad:
    lengths: Mapping[str, int]
    primary: tuple[str, ...]

    def __call__(self, example: Example) -> Example:
        return pad_example(example, self.lengths, self.primary)


def fit_rows(examples: grain.IterDataset, *, lengths: Mapping[str, int],
             primary: Sequence[str], packing: bool, bins: int = 16) -> grain.IterDataset:
    """Whole examples -> rows: first-fit packed into `bins` rows at a time (an example is never
    split), or one example per row. Features named in `lengths` are padded to that length;
    `<key>_segment_ids` and `<key>_positions` come with each `primary` feature."""
    if not packing:
        return examples.map(_Pad(dict(lengths), tuple(primary)))
    meta = tuple(k for k in lengths if k not in primary)
    return FirstFitPackIterDataset(examples, length_struct=dict(lengths), num_packing_bins=bins,
                                   shuffle_bins=False, meta_features=meta)
