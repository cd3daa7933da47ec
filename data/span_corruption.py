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

from data import packing
from data.packing import Doc, Example
from data.sources import DataError
from data.tokenizer import BOS, EOS, NUM_SENTINELS, Tokenizer


@dataclasses.dataclass(frozen=True)
class SpanConfig:
    """The `data.spans` section (see configs/base.py)."""
    noise_density: float = 0.15
    mean_length: float = 3.0

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


def _segment_lengths(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """`items` cut into `segments` non-empty runs at random; their lengths."""
    first = np.zeros(items, bool)
    first[1:] = rng.permutation(np.arange(items - 1) < segments - 1)
    return np.bincount(np.cumsum(first), minlength=segments)


def noise_mask(length: int, cfg: SpanConfig, rng: np.random.Generator) -> np.ndarray:
    """[length] bool, True on noise: spans alternate kept/noise, starting with kept tokens and
    ending with noise, so the number of noise spans is exactly `_lengths_after(...)[2]`."""
    _, _, spans = _lengths_after(length, cfg)
    noise = min(max(int(round(length * cfg.noise_density)), 1), length - 1)
    spans = min(spans, noise, length - noise)
    runs = np.stack([_segment_lengths(length - noise, spans, rng),
                     _segment_lengths(noise, spans, rng)], axis=1).reshape(-1)
    return np.repeat(np.arange(len(runs)) % 2 == 1, runs)


def corrupt(ids: np.ndarray, noise: np.ndarray, sentinels: np.ndarray) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """(inputs, targets) without EOS: each noise span -> its sentinel in the inputs, and the
    sentinel followed by the span's tokens in the targets."""
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    span_k = np.cumsum(starts) - 1                  # span number of each noise token
    if starts.sum() > len(sentinels):
        raise DataError(f"a chunk needs {starts.sum()} sentinels but the tokenizer has "
                        f"{len(sentinels)}; lower data.seq_len or raise data.spans.mean_length")
    inputs = np.where(starts, sentinels[np.maximum(span_k, 0)], ids)[~noise | starts]
    marks = np.flatnonzero(starts[noise])             # span starts among the noise tokens
    targets = np.insert(ids[noise], marks, sentinels[:len(marks)]).astype(np.int32)
    return inputs.astype(np.int32), targets


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
        examples = []
        for start in range(0, len(ids), self.chunk_len):
            chunk = ids[start:start + self.chunk_len]
            if len(chunk) < 2:
                continue
            inputs, targets = corrupt(chunk, noise_mask(len(chunk), self.cfg, rng),
                                      self.sentinels)
            examples.append(encoder_decoder_example(inputs, targets, doc.epoch))
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
