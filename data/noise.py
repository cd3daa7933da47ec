"""BART's denoising examples (Lewis et al. 2020): the decoder rebuilds a text from a noised copy.

A document is cut into sentences (data/sentence_pairs.py's `sentences`: line breaks, and
sentence-final punctuation inside long lines), and consecutive sentences are gathered into
chunks of at most `target_len - 1` tokens (a longer sentence is cut). The decoder's target is
the chunk + EOS, read shifted right behind BOS as in span corruption. The encoder reads the
chunk after these noises, in this order, each with its `data.noise.*` rate (0 = off):

  sentence permutation  a share `permute_rate` of the chunk's sentences trade places at random
                        (BART's permute_sentence_ratio; 1 = shuffle them all)
  document rotation     with probability `rotate_rate` the chunk is rotated to start at a
                        random token
  text infilling        spans of lengths drawn from Poisson(`infill_lambda`) until they cover a
                        share `infill_rate` of the tokens (the last span trimmed to fit, as
                        fairseq does); each span becomes ONE [MASK], a zero-length span inserts
                        one; spans never touch, so every [MASK] stands for one span
  token masking         a share `mask_rate` of the tokens (not yet [MASK]) become [MASK]
  token deletion        a share `delete_rate` of the tokens (not [MASK]) are removed

The three token rates are shares of the chunk's tokens, so together at most 1. The encoder
input ends with EOS; were zero-length spans ever to make it longer than `seq_len`, its tail is
cut. Every choice comes from the document's seed (its place in the stream), so resume is exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from configs.base import get_config as base_config
from data import sentence_pairs
from data.packing import Doc, Example
from data.span_corruption import encoder_decoder_example
from data.tokenizer import MASK, Tokenizer
from errors import DataError

RATES = ("mask_rate", "delete_rate", "infill_rate", "permute_rate", "rotate_rate")
TOKEN_RATES = ("mask_rate", "delete_rate", "infill_rate")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """The `data.noise` section (configs/base.py states each key's default and meaning)."""
    mask_rate: float
    delete_rate: float
    infill_rate: float
    infill_lambda: float
    permute_rate: float
    rotate_rate: float

    @classmethod
    def create(cls, **changes: Any) -> "NoiseConfig":
        """configs/base.py's `data.noise` with `changes`, checked."""
        return cls.from_mapping({**base_config().data.noise.to_dict(), **changes})

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "NoiseConfig":
        cfg = cls(**{f.name: float(m[f.name]) for f in dataclasses.fields(cls)})
        for key in RATES:
            if not 0 <= getattr(cfg, key) <= 1:
                raise DataError(f"data.noise.{key} must be in [0, 1], got {getattr(cfg, key)}")
        if not cfg.infill_lambda > 0:
            raise DataError(f"data.noise.infill_lambda must be positive (the mean span length), "
                            f"got {cfg.infill_lambda}")
        if sum(getattr(cfg, key) for key in TOKEN_RATES) > 1:
            raise DataError("data.noise.infill_rate + mask_rate + delete_rate = "
                            f"{sum(getattr(cfg, key) for key in TOKEN_RATES):g} is more than 1: "
                            "they are shares of the same tokens")
        return cfg

    @property
    def any(self) -> bool:
        return any(getattr(self, key) > 0 for key in RATES)


def chunks(sentence_ids: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    """Consecutive sentences gathered into chunks of at most `size` tokens; a sentence longer
    than `size` is cut into pieces of `size` (each piece a sentence of its own)."""
    out: list[list[np.ndarray]] = []
    current: list[np.ndarray] = []
    length = 0
    for ids in sentence_ids:
        for start in range(0, len(ids), size):
            piece = ids[start:start + size]
            if current and length + len(piece) > size:
                out.append(current)
                current, length = [], 0
            current.append(piece)
            length += len(piece)
    if current:
        out.append(current)
    return out


def permute_sentences(sentences: list[np.ndarray], rate: float,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """A share `rate` of the sentences (chosen at random) shuffled among their places."""
    n = int(np.rint(rate * len(sentences)))
    if n < 2:
        return list(sentences)
    chosen = rng.choice(len(sentences), n, replace=False)
    order = np.arange(len(sentences))
    order[chosen] = chosen[rng.permutation(n)]
    return [sentences[i] for i in order]


def rotate(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`ids` rotated to start at a random token other than the first."""
    if len(ids) < 2:
        return ids
    return np.roll(ids, -int(rng.integers(1, len(ids))))


def span_plan(n: int, rate: float, lam: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the infilling spans of `n` tokens: Poisson(`lam`) lengths summing to
    round(rate * n), with at least one untouched token between two spans."""
    budget = int(np.rint(rate * n))
    if budget == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    draws = np.zeros(0, np.int64)
    while draws.sum() < budget:
        draws = np.concatenate([draws, rng.poisson(lam, size=int(budget / lam) + 4)])
    k = int(np.searchsorted(np.cumsum(draws), budget)) + 1   # the first k reach the budget
    lengths = draws[:k].copy()
    lengths[-1] -= lengths.sum() - budget
    while k > 1 and k - 1 > n - budget:       # too many spans to keep apart: merge the last two
        lengths = np.concatenate([lengths[:-2], [lengths[-2] + lengths[-1]]])
        k -= 1
    # k + 1 gaps of the n - budget untouched tokens, the k - 1 inner ones at least 1 long
    free = n - budget - (k - 1)
    bars = np.sort(rng.choice(free + k, k, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars, [free + k]])) - 1
    gaps[1:-1] += 1
    starts = np.cumsum(gaps[:-1]) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts.astype(np.int64), lengths.astype(np.int64)


def infill(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
           mask_id: int) -> np.ndarray:
    """`ids` with each span (start, length) replaced by one `mask_id` (inserted if empty)."""
    hidden = np.zeros(len(ids), bool)
    for start, length in zip(starts, lengths):
        hidden[start:start + length] = True
    # a span's [MASK] goes before the first kept token after it: its start minus earlier spans
    at = starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.insert(ids[~hidden], at, mask_id).astype(np.int32)


def _choose(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[len] bool: `n` of the True places of `candidates`, uniformly."""
    where = np.flatnonzero(candidates)
    out = np.zeros(len(candidates), bool)
    out[rng.choice(where, min(n, len(where)), replace=False)] = True
    return out


def noised(sentences: list[np.ndarray], cfg: NoiseConfig, mask_id: int,
           rng: np.random.Generator) -> np.ndarray:
    """The encoder's ids (without EOS) for a chunk of sentences (see the module docstring)."""
    if cfg.permute_rate:
        sentences = permute_sentences(sentences, cfg.permute_rate, rng)
    ids = np.concatenate(sentences).astype(np.int32)
    n = len(ids)
    if cfg.rotate_rate and rng.random() < cfg.rotate_rate:
        ids = rotate(ids, rng)
    if cfg.infill_rate:
        ids = infill(ids, *span_plan(n, cfg.infill_rate, cfg.infill_lambda, rng), mask_id)
    if cfg.mask_rate:
        ids = np.where(_choose(ids != mask_id, int(np.rint(cfg.mask_rate * n)), rng), mask_id,
                       ids).astype(np.int32)
    if cfg.delete_rate:
        ids = ids[~_choose(ids != mask_id, int(np.rint(cfg.delete_rate * n)), rng)]
    return ids


@dataclasses.dataclass(frozen=True, eq=False)
class DenoiseExamples:
    """Doc -> denoising examples, one per chunk of at most `target_len - 1` tokens."""
    tokenizer: Tokenizer
    cfg: NoiseConfig
    seq_len: int
    target_len: int

    def __call__(self, doc: Doc) -> list[Example]:
        rng = doc.rng()
        mask_id = self.tokenizer.piece_id(MASK)
        sentence_ids = [self.tokenizer.encode_array(s)
                        for s in sentence_pairs.sentences(doc.text)]
        examples = []
        for chunk in chunks([s for s in sentence_ids if len(s)], self.target_len - 1):
            inputs = noised(chunk, self.cfg, mask_id, rng)[:self.seq_len - 1]
            examples.append(encoder_decoder_example(inputs, np.concatenate(chunk), doc.epoch))
        return examples
