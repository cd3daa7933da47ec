"""BERT-style masked-LM examples (also ELECTRA's generator inputs).

A share `rate` of the text tokens of each example (never [CLS], [SEP] or padding) is selected
for prediction: exactly round(rate * n) of them, as in BERT, or whole words until that budget is
met. Of the selected tokens `mask_fraction` become [MASK], `random_fraction` a random text piece
and the rest stay as they are. `targets` hold the original ids everywhere, `weights` mark the
selected tokens. ELECTRA uses the same inputs: its generator fills the masked positions and its
discriminator learns which tokens were replaced, both inside the objective.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import grain
import numpy as np

from configs.base import get_config as base_config
from data import packing, sentence_pairs
from data.packing import Doc, Example
from data.tokenizer import CLS, MASK, NEWLINE, SEP, Tokenizer
from errors import DataError

PAIR_MODES = ("none", "nsp", "sop")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """The `data.mlm` section (configs/base.py states each key's default and meaning)."""
    rate: float
    mask_fraction: float
    random_fraction: float
    whole_word: bool
    sentence_pairs: str

    @classmethod
    def create(cls, **changes: Any) -> "MaskConfig":
        """configs/base.py's `data.mlm` with `changes`, checked."""
        return cls.from_mapping({**base_config().data.mlm.to_dict(), **changes})

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "MaskConfig":
        cfg = cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})
        if not 0 < cfg.rate < 1:
            raise DataError(f"data.mlm.rate={cfg.rate} must be in (0, 1)")
        for key in ("mask_fraction", "random_fraction"):
            if not 0 <= getattr(cfg, key) <= 1:
                raise DataError(f"data.mlm.{key} must be in [0, 1], got {getattr(cfg, key)}")
        if cfg.mask_fraction + cfg.random_fraction > 1:
            raise DataError(f"data.mlm.mask_fraction={cfg.mask_fraction} and "
                            f"data.mlm.random_fraction={cfg.random_fraction} sum to more than 1 "
                            "(they are shares of the selected tokens)")
        if cfg.sentence_pairs not in PAIR_MODES:
            raise DataError(f"data.mlm.sentence_pairs={cfg.sentence_pairs!r}: choose one of "
                            f"{PAIR_MODES}")
        return cfg


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
    """The ids and per-piece tables masking needs, read once from the tokenizer."""
    mask_id: int
    cls_id: int
    sep_id: int
    special: np.ndarray       # [V] bool: control pieces, never selected
    word_start: np.ndarray    # [V] bool: pieces that begin a word
    breaks: np.ndarray        # [V] bool: pieces after which a new word begins (specials, \n)
    random_ids: np.ndarray    # text pieces a random replacement draws from

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "Vocab":
        special = tokenizer.special_mask()
        breaks = special.copy()
        breaks[tokenizer.piece_id(NEWLINE)] = True
        return cls(mask_id=tokenizer.piece_id(MASK), cls_id=tokenizer.piece_id(CLS),
                   sep_id=tokenizer.piece_id(SEP), special=special,
                   word_start=tokenizer.word_start_mask(), breaks=breaks,
                   random_ids=np.flatnonzero(~special).astype(np.int32))


def word_ids(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Word number of each token (a word is a word-start piece and the pieces after it; a
    special piece is a word of its own)."""
    starts = vocab.word_start[ids] | vocab.special[ids]
    starts[1:] |= vocab.breaks[ids[:-1]]
    starts[0] = True
    return np.cumsum(starts) - 1


def _whole_words(ids: np.ndarray, maskable: np.ndarray, budget: int, vocab: Vocab,
                 rng: np.random.Generator) -> np.ndarray:
    """[n] bool: whole words in random order, each taken if it fits what is left of `budget`."""
    words = np.where(maskable, word_ids(ids, vocab), -1)
    word_list, sizes = np.unique(words[maskable], return_counts=True)
    chosen, total = [], 0
    for k in rng.permutation(len(word_list)):
        if total + sizes[k] <= budget:
            chosen.append(word_list[k])
            total += sizes[k]
            if total == budget:
                break
    return np.isin(words, chosen) & maskable


def select(ids_NxL: np.ndarray, vocab: Vocab, rate: float, whole_word: bool,
           rng: np.random.Generator) -> np.ndarray:
    """[N, L] bool: the tokens of each row to predict, round(rate * its text tokens) of them
    (at least one), never a special piece."""
    maskable = ~vocab.special[ids_NxL]
    n_text = maskable.sum(axis=1)
    budget = np.where(n_text > 0, np.maximum(1, np.rint(rate * n_text)), 0).astype(int)
    if whole_word:
        return np.stack([_whole_words(ids, m, b, vocab, rng)
                         for ids, m, b in zip(ids_NxL, maskable, budget)])
    keys = rng.random(ids_NxL.shape)            # the `budget` smallest keys of text tokens
    keys[~maskable] = 2.0
    kth = np.sort(keys, axis=1)[np.arange(len(keys)), np.maximum(budget - 1, 0)]
    return (keys <= kth[:, None]) & maskable & (budget[:, None] > 0)


def corrupt(ids_NxL: np.ndarray, selected_NxL: np.ndarray, vocab: Vocab, cfg: MaskConfig,
            rng: np.random.Generator) -> np.ndarray:
    """Inputs: selected tokens -> [MASK] / random piece / unchanged (mask/random/keep split)."""
    where = np.flatnonzero(selected_NxL)
    u = rng.random(len(where), dtype=np.float32)
    replaced = where[(u >= cfg.mask_fraction) & (u < cfg.mask_fraction + cfg.random_fraction)]
    inputs = ids_NxL.copy()
    flat = inputs.reshape(-1)
    flat[where[u < cfg.mask_fraction]] = vocab.mask_id
    flat[replaced] = vocab.random_ids[rng.integers(len(vocab.random_ids), size=len(replaced))]
    return inputs


def masked_examples(ids_NxL: np.ndarray, type_ids_NxL: np.ndarray, epoch: int, vocab: Vocab,
                    cfg: MaskConfig, rng: np.random.Generator) -> list[Example]:
    """Rows of equal length -> masked examples (see the module docstring)."""
    selected = select(ids_NxL, vocab, cfg.rate, cfg.whole_word, rng)
    inputs = corrupt(ids_NxL, selected, vocab, cfg, rng)
    weights = selected.astype(np.float32)
    return [{"inputs": x, "targets": y, "weights": w, "type_ids": t, "epoch": epoch}
            for x, y, w, t in zip(inputs, ids_NxL, weights, type_ids_NxL.astype(np.int32))]


@dataclasses.dataclass(frozen=True, eq=False)
class MlmExamples:
    """Doc -> masked examples: [CLS] piece [SEP] per `seq_len - 2` tokens, or, with sentence
    pairs, [CLS] A [SEP] B [SEP] with a pair label (see data/sentence_pairs.py)."""
    tokenizer: Tokenizer
    vocab: Vocab
    cfg: MaskConfig
    seq_len: int
    partner: Callable[[np.random.Generator, str], str] | None = None   # (rng, exclude) -> text

    def __call__(self, doc: Doc) -> list[Example]:
        rng = doc.rng()
        if self.cfg.sentence_pairs != "none":
            return self._pairs(doc, rng)
        ids = self.tokenizer.encode_array(doc.text)
        size = self.seq_len - 2
        full = len(ids) // size             # the full pieces are masked together
        parts = [ids[:full * size].reshape(full, size)] if full else []
        if len(ids) > full * size or not len(ids):
            parts.append(ids[full * size:][None])
        examples = []
        for pieces in parts:
            rows = len(pieces)
            framed = np.hstack([np.full((rows, 1), self.vocab.cls_id), pieces,
                                np.full((rows, 1), self.vocab.sep_id)]).astype(np.int32)
            examples += masked_examples(framed, np.zeros_like(framed), doc.epoch, self.vocab,
                                        self.cfg, rng)
        return examples

    def _pairs(self, doc: Doc, rng: np.random.Generator) -> list[Example]:
        examples = []
        partner = (lambda r: self.partner(r, doc.text)) if self.partner else None
        for a, b, label in sentence_pairs.pairs(
                doc.text, self.tokenizer, self.cfg.sentence_pairs, self.seq_len - 3, rng,
                partner):
            ids = np.concatenate([[self.vocab.cls_id], a, [self.vocab.sep_id], b,
                                  [self.vocab.sep_id]]).astype(np.int32)
            type_ids = (np.arange(len(ids)) > len(a) + 1).astype(np.int32)
            [example] = masked_examples(ids[None], type_ids[None], doc.epoch, self.vocab,
                                        self.cfg, rng)
            examples.append(example | {"pair_labels": np.int32(label),
                                       "pair_weights": np.float32(1.0)})
        return examples


def mlm_rows(examples: grain.IterDataset, seq_len: int, *, packing_rows: bool,
             pairs: bool) -> grain.IterDataset:
    """Masked examples -> rows of `seq_len`: packed several to a row unless they are sentence
    pairs (one pair per row, since each row has one pair label)."""
    streams = {"": (seq_len, ("inputs", "targets", "weights", "type_ids"))}
    return packing.fit_rows(examples, streams, packing=packing_rows and not pairs)
