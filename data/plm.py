"""XLNet permutation-LM examples: a factorisation order per example and partial prediction.

Each example (a piece of at most `seq_len` tokens of one document) draws a random permutation
z of its n tokens from the document's seed, so a resumed run draws the same orders. `order`
holds each token's rank in z (0 = first); the model lets a token's content stream see the
tokens of rank <= its own and its query stream those of rank < its own, inside its segment.
Only the last floor(n * predict_ratio) tokens of the order are predicted (XLNet's partial
prediction with K = 1 / predict_ratio), so every predicted token has context before it.

Packed rows carry the per-token `order` of each example (ranks restart in each segment) and a
fixed number of prediction slots, `predict_slots(seq_len, ratio)`: the positions of the
predicted tokens in row order (`predict_positions`), their ids (`targets`) and `weights`
(1 for a used slot, 0 after the last). A row never predicts more than the slots hold: the
floors of the segments sum to at most the floor of the row's.
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


def permuted(ids: np.ndarray, ratio: float, rng: np.random.Generator, epoch: int) -> Example:
    """One example: its tokens, each token's rank in a random factorisation order, and which
    tokens are predicted (the last floor(n * ratio) ranks)."""
    n = len(ids)
    order = np.empty(n, np.int32)
    order[rng.permutation(n)] = np.arange(n, dtype=np.int32)
    predict = (order >= n - predicted_count(n, ratio)).astype(np.int32)
    return {"inputs": ids.astype(np.int32), "order": order, "predict": predict, "epoch": epoch}


@dataclasses.dataclass(frozen=True, eq=False)
class PlmExamples:
    """Doc -> permuted examples of at most `seq_len` tokens each (no [BOS]/[EOS]: XLNet reads
    plain text; an empty document gives none)."""
    tokenizer: Tokenizer
    cfg: PlmConfig
    seq_len: int

    def __call__(self, doc: Doc) -> list[Example]:
        rng = doc.rng()
        ids = self.tokenizer.encode_array(doc.text)
        return [permuted(ids[i:i + self.seq_len], self.cfg.predict_ratio, rng, doc.epoch)
                for i in range(0, len(ids), self.seq_len)]


@dataclasses.dataclass(frozen=True)
class _Slots:
    """A packed row -> its prediction slots (see the module docstring)."""
    slots: int

    def __call__(self, row: Example) -> Example:
        row = dict(row)
        where = np.flatnonzero(row.pop("predict"))
        assert len(where) <= self.slots, (len(where), self.slots)
        positions = np.zeros(self.slots, np.int32)
        positions[:len(where)] = where
        weights = (np.arange(self.slots) < len(where)).astype(np.float32)
        return {**row, "predict_positions": positions,
                "targets": np.where(weights > 0, row["inputs"][positions], 0).astype(np.int32),
                "weights": weights}


def plm_rows(examples: grain.IterDataset, seq_len: int, ratio: float, *,
             packing_rows: bool) -> grain.IterDataset:
    """Permuted examples -> rows of `seq_len` (packed several to a row, or padded) with their
    prediction slots."""
    streams = {"": (seq_len, ("inputs", "order", "predict"))}
    rows = packing.fit_rows(examples, streams, packing=packing_rows)
    return rows.map(_Slots(predict_slots(seq_len, ratio)))
