"""T5's encoder-decoder examples: span corruption and prefix-LM.

Span corruption (Raffel et al., `random_spans_noise_mask` in T5): in a chunk of tokens, a share
`noise_density` forms spans of mean length `mean_span`; the encoder sees the chunk with each span
replaced by the next sentinel (<extra_id_0>, <extra_id_1>, ...), the decoder predicts each
sentinel followed by the span it hides. Chunk length is chosen so the encoder input fills
`seq_len` exactly (T5's compute_input_and_target_lengths). Prefix-LM: a chunk is cut at a random
point; the encoder reads the prefix, the decoder continues it. Both end inputs and targets with
EOS; the decoder reads its targets shifted right behind BOS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

from configs.base import get_config as base_config
from data import packing
from data.packing import Doc, Example
from data.tokenizer import BOS, EOS, NUM_SENTINELS, Tokenizer
from errors import DataError


@dataclasses.dataclass(frozen=True)
class SpanConfig:
    """The `data.spans` section (configs/base.py states each key's default and meaning)."""
    noise_density: float
    mean_length: float

    @classmethod
    def create(cls, **changes: Any) -> "SpanConfig":
        """configs/base.py's `data.spans` with `changes`, checked."""
        return cls.from_mapping({**base_config().data.spans.to_dict(), **changes})

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "SpanConfig":
        cfg = cls(noise_density=float(m["noise_density"]), mean_length=float(m["mean_length"]))
        if not 0 < cfg.noise_density < 1:
            raise DataError(f"data.spans.noise_density={cfg.noise_density} must be in (0, 1)")
        if cfg.mean_length < 1:
            raise DataError(f"data.spans.mean_length={cfg.mean_length} must be >= 1")
        return cfg


def _lengths_after(tokens: int, cfg: SpanConfig) -> tuple[int, int, int]:
    """(encoder length, decoder length, spans) for a chunk of `tokens`, EOS included."""
    noise = min(max(int(round(tokens * cfg.noise_density)), 1), tokens - 1)
    spans = max(int(round(noise / cfg.mean_length)), 1)
    return tokens - noise + spans + 1, noise + spans + 1, spans


def chunk_and_target_lengths(inputs_length: int, cfg: SpanConfig) -> tuple[int, int]:
    """The longest chunk whose corrupted encoder input (with EOS) fits `inputs_length`, and the
    decoder length it needs (T5's compute_input_and_target_lengths)."""
    tokens = max(inputs_length - 1, 2)
    while _lengths_after(tokens + 1, cfg)[0] <= inputs_length:
        tokens += 1
    return tokens, _lengths_after(tokens, cfg)[1]


def _segment_lengths(rows: int, items: int, segments: int,
                     rng: np.random.Generator) -> np.ndarray:
    """[rows, segments]: `items` cut into `segments` non-empty runs at random, for each row (a
    uniformly random set of cut points, as T5's random segmentation)."""
    if segments == 1:
        return np.full((rows, 1), items)
    keys = rng.random((rows, items - 1))
    cuts = np.sort(np.argpartition(keys, segments - 2, axis=1)[:, :segments - 1], axis=1) + 1
    bounds = np.concatenate([np.zeros((rows, 1), int), cuts, np.full((rows, 1), items)], axis=1)
    return np.diff(bounds, axis=1)


def span_lengths(rows: int, length: int, cfg: SpanConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[rows, spans] lengths of the kept runs and of the noise spans of `rows` chunks of
    `length` tokens. Runs alternate kept/noise, starting with kept tokens and ending with noise;
    the number of noise spans is `_lengths_after(length)[2]`."""
    _, _, spans = _lengths_after(length, cfg)
    noise = min(max(int(round(length * cfg.noise_density)), 1), length - 1)
    spans = min(spans, noise, length - noise)
    return (_segment_lengths(rows, length - noise, spans, rng),
            _segment_lengths(rows, noise, spans, rng))


def noise_mask(keep_NxK: np.ndarray, noise_NxK: np.ndarray) -> np.ndarray:
    """[rows, length] bool, True on noise, from the run lengths of `span_lengths`."""
    rows, spans = keep_NxK.shape
    runs = np.stack([keep_NxK, noise_NxK], axis=2).reshape(-1)
    return np.repeat(np.tile([False, True], rows * spans), runs).reshape(rows, -1)


def _with_sentinels(values_NxM: np.ndarray, at_NxK: np.ndarray,
                    sentinels: np.ndarray) -> np.ndarray:
    """Rows of `values` with sentinel k placed before column at[:, k] of each row."""
    rows, spans = at_NxK.shape
    out = np.empty((rows, values_NxM.shape[1] + spans), np.int32)
    marks = np.zeros(out.shape, bool)
    np.put_along_axis(marks, at_NxK + np.arange(spans), True, axis=1)
    out[marks] = np.tile(sentinels[:spans], rows)
    out[~marks] = values_NxM.ravel()
    return out


def corrupt(ids_NxL: np.ndarray, keep_NxK: np.ndarray, noise_NxK: np.ndarray,
            sentinels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of each row, without EOS: noise span k -> sentinel k in the inputs,
    and sentinel k followed by the span's tokens in the targets."""
    rows, spans = keep_NxK.shape
    if spans > len(sentinels):
        raise DataError(f"a chunk needs {spans} sentinels but the tokenizer has "
                        f"{len(sentinels)}; lower data.seq_len or raise data.spans.mean_length")
    noise = noise_mask(keep_NxK, noise_NxK)
    kept = ids_NxL[~noise].reshape(rows, -1)
    hidden = ids_NxL[noise].reshape(rows, -1)
    inputs = _with_sentinels(kept, np.cumsum(keep_NxK, axis=1), sentinels)
    targets = _with_sentinels(hidden, np.cumsum(noise_NxK, axis=1) - noise_NxK, sentinels)
    return inputs, targets


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """The original chunk from corrupted inputs and targets (EOS removed): the inverse of
    `corrupt`, used to check that no token is lost or invented."""
    is_sentinel = np.isin(targets, sentinels)
    spans = np.split(targets, np.flatnonzero(is_sentinel))[1:]
    by_sentinel = {int(span[0]): span[1:] for span in spans}
    out = [by_sentinel[int(t)] if t in by_sentinel else np.array([t]) for t in inputs]
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


def encoder_decoder_example(inputs: np.ndarray, targets: np.ndarray, epoch: int) -> Example:
    inputs = np.append(inputs, EOS).astype(np.int32)
    targets = np.append(targets, EOS).astype(np.int32)
    return {"encoder_inputs": inputs, "decoder_targets": targets,
            "decoder_inputs": np.concatenate([[BOS], targets[:-1]]).astype(np.int32),
            "decoder_weights": np.ones(len(targets), np.float32), "epoch": epoch}


@dataclasses.dataclass(frozen=True, eq=False)
class SpanCorruptionExamples:
    """Doc -> span-corrupted examples, one per chunk of `chunk_len` tokens."""
    tokenizer: Tokenizer
    cfg: SpanConfig
    chunk_len: int
    sentinels: np.ndarray

    def __call__(self, doc: Doc) -> list[Example]:
        rng = doc.rng()
        ids = self.tokenizer.encode_array(doc.text)
        full = len(ids) // self.chunk_len    # the full chunks are corrupted together
        parts = [ids[:full * self.chunk_len].reshape(full, self.chunk_len)] if full else []
        if len(ids) - full * self.chunk_len >= 2:
            parts.append(ids[full * self.chunk_len:][None])
        examples = []
        for chunks in parts:
            keep, noise = span_lengths(len(chunks), chunks.shape[1], self.cfg, rng)
            inputs, targets = corrupt(chunks, keep, noise, self.sentinels)
            eos = np.full((len(chunks), 1), EOS, np.int32)
            inputs, targets = np.hstack([inputs, eos]), np.hstack([targets, eos])
            shifted = np.hstack([np.full_like(eos, BOS), targets[:, :-1]])
            weights = np.ones(targets.shape, np.float32)
            examples += [{"encoder_inputs": x, "decoder_targets": y, "decoder_inputs": d,
                          "decoder_weights": w, "epoch": doc.epoch}
                         for x, y, d, w in zip(inputs, targets, shifted, weights)]
        return examples


@dataclasses.dataclass(frozen=True)
class PrefixLmExamples:
    """Doc -> prefix-LM examples: a prefix of random length (1 .. seq_len - 1 tokens) for the
    encoder, the next target_len - 1 tokens for the decoder, then the next example."""
    tokenizer: Tokenizer
    seq_len: int
    target_len: int

    def __call__(self, doc: Doc) -> list[Example]:
        rng = doc.rng()
        ids = self.tokenizer.encode_array(doc.text)
        examples, start = [], 0
        while len(ids) - start >= 2:
            cut = min(int(rng.integers(1, self.seq_len)), len(ids) - start - 1)
            end = min(start + cut + self.target_len - 1, len(ids))
            examples.append(encoder_decoder_example(ids[start:start + cut],
                                                    ids[start + cut:end], doc.epoch))
            start = end
        return examples


def encoder_decoder_rows(examples: grain.IterDataset, seq_len: int, target_len: int, *,
                         packing_rows: bool) -> grain.IterDataset:
    """Examples -> rows of encoder length `seq_len` and decoder length `target_len`; packed
    examples share a segment id on both sides."""
    streams = {"encoder_": (seq_len, ("encoder_inputs",)),
               "decoder_": (target_len, ("decoder_inputs", "decoder_targets", "decoder_weights"))}
    return packing.fit_rows(examples, streams, packing=packing_rows)


def sentinel_ids(tokenizer: Tokenizer, chunk_len: int, cfg: SpanConfig) -> np.ndarray:
    """The sentinels a chunk can need, checked against what the tokenizer has."""
    needed = _lengths_after(chunk_len, cfg)[2]
    if needed > NUM_SENTINELS:
        raise DataError(f"span corruption of {chunk_len}-token chunks needs {needed} sentinels; "
                        f"the tokenizer has {NUM_SENTINELS}. Lower data.seq_len or raise "
                        "data.spans.mean_length")
    return tokenizer.sentinels(needed)
