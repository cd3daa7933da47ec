"""Synthetic batches in the exact layout of every objective (see train/objectives.py), for
benchmarks and tests that run without a data pipeline or a tokenizer.

Apart from clm's uniform random tokens, rows are learnable: a random motif of PERIOD tokens
repeated, so a model can recover a masked, replaced or continued token from a copy one period
away, and a falling loss shows that an objective trains. Ids below FIRST_TOKEN stand in for
special tokens, in data/tokenizer.py's order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data import plm
from data.tokenizer import BOS, EOS

MASK, CLS, SEP = 5, 6, 7
FIRST_TOKEN = 16
PERIOD = 4
SPAN_LENGTH, NOISE_DENSITY = 3, 0.15   # T5's mean span length and corruption rate
PLM_RATIO = 1 / 6                      # XLNet's partial prediction, K = 6
Batch = dict[str, np.ndarray]


def periodic(rng: np.random.Generator, rows: int, length: int, vocab: int) -> np.ndarray:
    """rows x length ids in [FIRST_TOKEN, vocab): a random motif of PERIOD ids, repeated."""
    motifs = rng.integers(FIRST_TOKEN, vocab, (rows, PERIOD)).astype(np.int32)
    return np.tile(motifs, (1, -(-length // PERIOD)))[:, :length]


def _unpacked(rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """positions and segment ids of one example per row, no padding."""
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    return positions, np.ones((rows, length), np.int32)


def clm_batch(rows: int, length: int, vocab: int, seed: int) -> dict[str, jax.Array]:
    """Uniformly random tokens in the layout of a causal-LM batch."""
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (rows, length + 1), 0, vocab,
                                jnp.int32)
    positions, segments = _unpacked(rows, length)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": segments, "weights": np.ones((rows, length), np.float32)}


def mlm_batch(rows: int, length: int, vocab: int, seed: int, *, pairs: bool,
              mask_rate: float = 0.15) -> Batch:
    """BERT rows: [CLS] A [SEP] B [SEP] with B the true continuation of A (pair_labels 1) or an
    unrelated row (0); or, without pairs, [CLS] A [SEP]. `mask_rate` of the ordinary
    tokens are selected (at least one per row): 80% [MASK], 10% random, 10% kept."""
    rng = np.random.default_rng(seed)
    n = length - (3 if pairs else 2)
    text = periodic(rng, rows, n, vocab)
    column = lambda token: np.full((rows, 1), token, np.int32)  # noqa: E731
    if pairs:
        split = n // 2
        labels = rng.integers(0, 2, rows).astype(np.int32)
        second = np.where(labels[:, None] == 1, text[:, split:],
                          periodic(rng, rows, n - split, vocab))
        tokens = np.concatenate([column(CLS), text[:, :split], column(SEP), second, column(SEP)], 1)
        type_ids = (np.arange(length) >= split + 2).astype(np.int32)[None].repeat(rows, 0)
    else:
        tokens = np.concatenate([column(CLS), text, column(SEP)], 1)
        type_ids = np.zeros((rows, length), np.int32)
    ordinary = tokens >= FIRST_TOKEN
    selected = (rng.random((rows, length)) < mask_rate) & ordinary
    selected[~selected.any(1), 1] = True
    draw = rng.random((rows, length))
    random_ids = rng.integers(FIRST_TOKEN, vocab, (rows, length)).astype(np.int32)
    inputs = np.where(selected & (draw < 0.8), MASK,
                      np.where(selected & (draw < 0.9), random_ids, tokens)).astype(np.int32)
    positions, segments = _unpacked(rows, length)
    batch = {"inputs": inputs, "targets": tokens, "positions": positions, "segment_ids": segments,
             "type_ids": type_ids, "weights": selected.astype(np.float32)}
    if pairs:
        batch.update(pair_labels=labels, pair_weights=np.ones((rows,), np.float32))
    return batch


def span_corruption_length(length: int) -> tuple[int, int]:
    """(spans, decoder length) of a span-corrupted row whose encoder input has `length` tokens."""
    spans = max(1, round(length * NOISE_DENSITY / SPAN_LENGTH))
    return spans, spans * (SPAN_LENGTH + 1) + 1


def span_corruption_batch(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """T5 rows: spans of SPAN_LENGTH tokens, one per equal stretch of the text, each replaced by
    a sentinel (ids counting down from the top of the vocabulary) in the encoder input; the
    decoder predicts sentinel, span, sentinel, span, ..., EOS."""
    rng = np.random.default_rng(seed)
    spans, decoder_length = span_corruption_length(length)
    original = length + spans * (SPAN_LENGTH - 1)
    text = periodic(rng, rows, original, vocab - spans)
    stretch = original // spans
    encoder, targets = [], []
    for row in text:
        starts = [i * stretch + rng.integers(0, stretch - SPAN_LENGTH + 1) for i in range(spans)]
        enc, dec, cursor = [], [], 0
        for i, start in enumerate(starts):
            sentinel = vocab - 1 - i
            enc += list(row[cursor:start]) + [sentinel]
            dec += [sentinel] + list(row[start:start + SPAN_LENGTH])
            cursor = start + SPAN_LENGTH
        encoder.append(enc + list(row[cursor:]))
        targets.append(dec + [EOS])
    return _seq2seq(np.array(encoder, np.int32), np.array(targets, np.int32))


def prefix_lm_batch(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """Prefix-LM rows: the encoder reads `length` tokens, the decoder continues for `length`."""
    text = periodic(np.random.default_rng(seed), rows, 2 * length, vocab)
    return _seq2seq(text[:, :length], text[:, length:])


def denoise_batch(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """BART rows: the encoder reads `length` - 1 tokens of text with 30% of them [MASK] (token
    masking, which keeps both sides `length` long) and EOS; the decoder rebuilds the text."""
    rng = np.random.default_rng(seed)
    text = np.concatenate([periodic(rng, rows, length - 1, vocab),
                           np.full((rows, 1), EOS, np.int32)], 1)
    masked = (rng.random((rows, length)) < 0.3) & (text != EOS)
    return _seq2seq(np.where(masked, MASK, text).astype(np.int32), text)


def _seq2seq(encoder_BxT: np.ndarray, targets_BxS: np.ndarray) -> Batch:
    rows, length = encoder_BxT.shape
    decoder_length = targets_BxS.shape[1]
    bos = np.full((rows, 1), BOS, np.int32)
    enc_positions, enc_segments = _unpacked(rows, length)
    dec_positions, dec_segments = _unpacked(rows, decoder_length)
    return {"encoder_inputs": encoder_BxT, "encoder_positions": enc_positions,
            "encoder_segment_ids": enc_segments,
            "decoder_inputs": np.concatenate([bos, targets_BxS[:, :-1]], 1),
            "decoder_targets": targets_BxS, "decoder_positions": dec_positions,
            "decoder_segment_ids": dec_segments,
            "decoder_weights": np.ones((rows, decoder_length), np.float32)}


def plm_batch(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """XLNet rows: periodic text, one random factorisation order per row, the last
    floor(length * PLM_RATIO) of it predicted (data/plm.py's layout, unpacked)."""
    rng = np.random.default_rng(seed)
    tokens = periodic(rng, rows, length, vocab)
    positions, segments = _unpacked(rows, length)
    orders = [plm.order_and_predicted(rng.random(length), s, PLM_RATIO) for s in segments]
    predict = np.stack([np.flatnonzero(p) for _, p in orders]).astype(np.int32)
    return {"inputs": tokens, "positions": positions, "segment_ids": segments,
            "order": np.stack([o for o, _ in orders]), "predict_positions": predict,
            "targets": np.take_along_axis(tokens, predict, 1),
            "weights": np.ones(predict.shape, np.float32)}


N_SYNTHETIC_LABELS = 4


def _task_rows(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """Unpacked periodic rows, the inputs of the synthetic classify and tag batches."""
    tokens = periodic(np.random.default_rng(seed), rows, length, vocab)
    positions, segments = _unpacked(rows, length)
    return {"inputs": tokens, "positions": positions, "segment_ids": segments,
            "type_ids": np.zeros_like(tokens)}


def classify_batch(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """Periodic rows whose label is their motif's first id modulo N_SYNTHETIC_LABELS."""
    batch = _task_rows(rows, length, vocab, seed)
    return {**batch, "labels": (batch["inputs"][:, 0] % N_SYNTHETIC_LABELS).astype(np.int32),
            "label_weights": np.ones(rows, np.float32)}


def tag_batch(rows: int, length: int, vocab: int, seed: int) -> Batch:
    """Periodic rows tagged per token by id modulo N_SYNTHETIC_LABELS."""
    batch = _task_rows(rows, length, vocab, seed)
    return {**batch, "tags": (batch["inputs"] % N_SYNTHETIC_LABELS).astype(np.int32),
            "tag_weights": np.ones(batch["inputs"].shape, np.float32)}
