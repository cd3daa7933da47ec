"""SentencePiece vocabularies: training one on a corpus sample, loading, and checking identity.

Ids 0-3 are <pad>, <unk>, <s> (BOS), </s> (EOS); then "\\n" (so code keeps its lines in one
piece), [MASK], [CLS], [SEP] and T5 sentinels <extra_id_0..>, which every objective can share.
Text is kept byte-exact (identity normalisation, no whitespace folding, byte fallback).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data.sources import DataError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_PIECES = ("\n", "[MASK]", "[CLS]", "[SEP]")
SPACE_MARK = "\u2581"  # sentencepiece's "▁", standing for a space inside pieces


class Tokenizer:
    """A sentencepiece model held as its serialized proto (so it pickles into data workers)."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.model_proto = model_proto
        self.source = source
        self._sp = self._load(model_proto, source)

    @staticmethod
    def _load(proto: bytes, source: str) -> spm.SentencePieceProcessor:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception:
            raise DataError(f"{source} is not a sentencepiece model; point data.tokenizer.path at "
                            "a .model file, or leave it empty to train one") from None
        return sp

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist (data.tokenizer.path)")
        return cls(path.read_bytes(), str(path))

    def __getstate__(self):
        return {"model_proto": self.model_proto, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["source"])

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()[:16]

    def piece_id(self, piece: str) -> int:
        """Id of a special piece; an error if this vocabulary does not have it."""
        i = self._sp.piece_to_id(piece)
        if i == UNK and piece != self._sp.id_to_piece(UNK):
            raise DataError(f"tokenizer {self.source} has no piece {piece!r}")
        return i

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(id, begin, end) per piece: the UTF-8 byte span of `text` the piece stands for.

        The dummy-prefix piece spans nothing (begin == end == 0); the byte-fallback pieces of one
        character all begin where it begins.
        """
        return [(p.id, p.begin, p.end) for p in self._sp.encode(text, return_type="proto").pieces]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.vocab_size
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < n])

    def piece_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id adds to decoded text: 0 for control and unknown pieces, 1 for a
        byte-fallback piece, else the piece's text with the leading-space marker as one space.

        With `adds_dummy_prefix`, decoding drops the space of a document's first piece, so a
        document's bytes are the sum over its ids minus 1 (see train/eval.py).
        """
        sp = self._sp

        def size(i: int) -> int:
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                return 0
            if sp.is_byte(i):
                return 1
            return len(sp.id_to_piece(i).replace(SPACE_MARK, " ").encode("utf-8"))

        return np.array([size(i) for i in range(self.vocab_size)], np.int32)

    @property
    def adds_dummy_prefix(self) -> bool:
        """Whether encoding prepends a space marker that decoding removes again."""
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(self.model_proto)
        return model.normalizer_spec.add_dummy_prefix

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.model_proto)
        os.replace(tmp, path)


def _lines(texts: Iterable[str], max_chars: int, max_line: int) -> Iterator[str]:
    """Non-empty lines of the first `max_chars` characters of `texts`."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip() and len(line.encode()) < max_line:
                yield line
                seen += len(line)
                if seen >= max_chars:
                    return


def train(texts: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
          max_chars: int = 5_000_000, num_sentinels: int = 100,
          character_coverage: float = 0.9995, num_threads: int | None = None) -> Tokenizer:
    """Trains a sentencepiece model on a bounded sample of `texts`."""
    if model_type not in ("unigram", "bpe"):
        raise DataError(f"tokenizer model_type {model_type!r}: choose unigram or bpe")
    specials = list(SPECIAL_PIECES) + [f"<extra_id_{i}>" for i in range(num_sentinels)]
    minimum = 4 + len(specials) + 256 + 16  # ids 0-3, specials, byte fallback, a few pieces
    if vocab_size < minimum:
        raise DataError(f"tokenizer vocab_size {vocab_size} is too small: the special tokens and "
                        f"byte fallback alone need {minimum - 16}; use at least {minimum}")
    max_line = 1 << 14
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, max_chars, max_line), model_writer=writer,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, user_defined_symbols=specials,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=character_coverage, max_sentence_length=max_line,
            hard_vocab_limit=False, minloglevel=2,
            num_threads=num_threads or min(16, os.cpu_count() or 1))
    except RuntimeError as e:
        raise DataError(f"training the tokenizer failed: {e}") from None
    return Tokenizer(writer.getvalue(), f"<trained: {model_type}, {vocab_size}>")
