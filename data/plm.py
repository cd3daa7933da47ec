"""XLNet permutation-LM rows: a factorisation order per segment and partial prediction.

Every token of a document draws a random key from the document's seed (so a resumed run draws
the same orders); rows are packed like causal-LM rows (full, a document continuing in the next
row), and each segment's factorisation order z is its tokens sorted by key, a uniformly random
permutation of whatever part of the document the segment holds. `order` holds each token's
rank in z (0 = first); the model lets a token's content stream see the tokens of rank <= its
own and its query stream those of rank < its own, inside its segment. Only the last
floor(n * predict_ratio) tokens of a segment's order are predicted (XLNet's partial prediction,
K = 1 / predict_ratio), so every predicted token has context before it.

A row has a fixed number of prediction slots, `predict_slots(seq_len, ratio)`: the positions
of the predicted tokens in row order (`predict_positions`), their ids (`targets`) and
`weights` (1 for a used slot, 0 after the last). A row never predicts more than the slots
hold: the floors of its segments sum to at most the floor of the row's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

from configs.base import get_config as base_config
from data import packing
from data.packing import Doc, Example
from data.tokenizer import Tokenizer
from errors import DataError


def predict_slots(seq_len: int, ratio: float) -> int:
    """Prediction slots P of a row of `seq_len` tokens: floor(seq_len * ratio)."""
    return int(np.floor(seq_len * ratio + 1e-9))


def predicted_count(n: int, ratio: float) -> int:
    """Tokens predicted of an example of n: the last floor(n * ratio) of its order."""
    return int(np.floor(n * ratio + 1e-9))


@dataclasses.dataclass(frozen=True)
class PlmConfig:
    """The `data.plm` section (configs/base.py states each key's default and meaning)."""
    predict_ratio: float

    @classmethod
    def create(cls, **changes: Any) -> "PlmConfig":
        return cls.from_mapping({**base_config().data.plm.to_dict(), **changes})

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "PlmConfig":
        cfg = cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})
        if not 0 < cfg.predict_ratio < 1:
            raise DataError(f"data.plm.predict_ratio={cfg.predict_ratio} must be in (0, 1) "
                            "(XLNet predicts the last 1/K of each order, K = 6 or 7)")
        return cfg

    def check_length(self, seq_len: int) -> None:
        if predict_slots(seq_len, self.predict_ratio) < 1:
            raise DataError(f"data.seq_len={seq_len} x data.plm.predict_ratio="
                            f"{self.predict_ratio} predicts no token of a row; raise one of them")


def order_and_predicted(keys_T: np.ndarray, segment_ids_T: np.ndarray, ratio: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Each token's rank in its segment's factorisation order (the segment's tokens sorted by
    their random keys, a uniformly random permutation), and whether it is predicted (the last
    floor(n * ratio) ranks of a segment of n); padding (segment 0) gets rank 0, unpredicted."""
    order = np.zeros(len(keys_T), np.int32)
    predict = np.zeros(len(keys_T), bool)
    for s in np.unique(segment_ids_T[segment_ids_T > 0]):
        where = np.flatnonzero(segment_ids_T == s)
        ranks = np.empty(len(where), np.int32)
        ranks[np.argsort(keys_T[where], kind="stable")] = np.arange(len(where))
        order[where] = ranks
        predict[where] = ranks >= len(where) - predicted_count(len(where), ratio)
    return order, predict


@dataclasses.dataclass(frozen=True, eq=False)
class PlmExamples:
    """Doc -> pieces of at most `seq_len` tokens, each token with a random key drawn from the
    document's seed (no [BOS]/[EOS]: XLNet reads plain text; an empty document gives none)."""
    tokenizer: Tokenizer
    seq_len: int

    def __call__(self, doc: Doc) -> list[Example]:
        rng = doc.rng()
        ids = self.tokenizer.encode_array(doc.text).astype(np.int32)
        keys = rng.random(len(ids), dtype=np.float32)
        return [{"inputs": ids[i:i + self.seq_len], "keys": keys[i:i + self.seq_len],
                 "epoch": doc.epoch} for i in range(0, len(ids), self.seq_len)]


@dataclasses.dataclass(frozen=True)
class _Orders:
    """A packed row -> its orders and prediction slots (see the module docstring)."""
    ratio: float
    slots: int

    def __call__(self, row: Example) -> Example:
        row = dict(row)
        order, predict = order_and_predicted(row.pop("keys"), row["segment_ids"], self.ratio)
        where = np.flatnonzero(predict)
        assert len(where) <= self.slots, (len(where), self.slots)
        positions = np.zeros(self.slots, np.int32)
        positions[:len(where)] = where
        weights = (np.arange(self.slots) < len(where)).astype(np.float32)
        return {**row, "order": order, "predict_positions": positions,
                "targets": np.where(weights > 0, row["inputs"][positions], 0).astype(np.int32),
                "weights": weights}


def plm_rows(pieces: grain.IterDataset, seq_len: int, ratio: float, *,
             packing_rows: bool) -> grain.IterDataset:
    """Keyed pieces -> rows of `seq_len` with their orders and prediction slots. Packing fills
    rows completely, a document continuing in the next row (positions restarting, as for
    clm); otherwise each piece is padded."""
    streams = {"": (seq_len, ("inputs", "keys"))}
    rows = packing.fit_rows(pieces, streams, packing=packing_rows, split=True)
    return rows.map(_Orders(ratio, predict_slots(seq_len, ratio)))
