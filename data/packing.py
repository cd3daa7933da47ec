"""Causal-LM examples: documents to (inputs, targets) pieces, then packed or padded rows.

Every row carries `segment_ids` (1, 2, ... per document piece, 0 for padding), `positions`
(restarting at 0 in each piece) and `weights` (1 where the target is a real next token), so the
model never attends across documents and the loss never counts padding.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

Example = dict[str, np.ndarray]


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


def _rename_packed(row: Example) -> Example:
    segment_ids = row["targets_segment_ids"].astype(np.int32)
    return {"inputs": row["inputs"].astype(np.int32), "targets": row["targets"].astype(np.int32),
            "segment_ids": segment_ids, "positions": row["inputs_positions"].astype(np.int32),
            "weights": (segment_ids != 0).astype(np.float32)}


def _pad_piece(piece: Example, seq_len: int, pad_id: int) -> Example:
    n = len(piece["inputs"])
    pad = seq_len - n

    def padded(x):
        return np.pad(x, (0, pad), constant_values=pad_id).astype(np.int32)

    real = np.arange(seq_len) < n
    return {"inputs": padded(piece["inputs"]), "targets": padded(piece["targets"]),
            "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
            "weights": real.astype(np.float32)}


def clm_rows(pieces: grain.IterDataset, seq_len: int, *, packing: bool,
             pad_id: int) -> grain.IterDataset:
    """Document pieces -> fixed-length causal-LM rows (see module docstring)."""
    if packing:
        packed = ConcatThenSplitIterDataset(pieces, length_struct={"inputs": seq_len,
                                                                   "targets": seq_len})
        return packed.map(_rename_packed)
    return pieces.map(lambda piece: _pad_piece(piece, seq_len, pad_id))
