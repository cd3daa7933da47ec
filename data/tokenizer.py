"""SentencePiece vocabularies: training one on a corpus sample, loading, encoding, identity.

Ids 0-3 are <pad>, <unk>, <s> (BOS), </s> (EOS); then "\\n" (so code keeps its lines in one
piece), then the control pieces every objective can share: [MASK], [CLS], [SEP] and the T5
sentinels <extra_id_0..>. Control pieces are never produced from text, so a document that
literally contains "[MASK]" or "<extra_id_0>" cannot fake one. Text is kept byte-exact
(identity normalisation, no whitespace folding, no dummy prefix, byte fallback), which also
makes encoding concatenative at line breaks: long documents are encoded in chunks.

    python -m data.tokenizer train --input 'docs/**/*.txt' --vocab-size 8192 \\
        --model-type unigram --out runs/vocab [--character-coverage 1.0 for CJK]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from configs.base import get_config as base_config
from errors import DataError, fail_cleanly

PAD, UNK, BOS, EOS = 0, 1, 2, 3
NEWLINE = "\n"
MASK, CLS, SEP = "[MASK]", "[CLS]", "[SEP]"
NUM_SENTINELS = 100
CONTROL_PIECES = (MASK, CLS, SEP) + tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))
WORD_START = "\u2581"           # sentencepiece's visible space, first char of a word's piece
ENCODE_CHUNK_CHARS = 1 << 20    # longer texts are encoded line-aligned chunks at a time
MODEL_FILE = "tokenizer.model"


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
        except Exception as e:   # sentencepiece's C++ errors arrive as assorted types
            raise DataError(f"{source} is not a sentencepiece model; point data.tokenizer.path at "
                            "a .model file, or leave it empty to train one") from e
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
            raise DataError(f"tokenizer {self.source} has no piece {piece!r}; train one with "
                            "`python -m data.tokenizer train` (it adds every special piece)")
        return i

    def sentinels(self, n: int) -> np.ndarray:
        """Ids of <extra_id_0> .. <extra_id_{n-1}>, in order."""
        return np.array([self.piece_id(f"<extra_id_{i}>") for i in range(n)], np.int32)

    def special_mask(self) -> np.ndarray:
        """[vocab] bool: pieces that are not text (pad, bos, eos, [MASK], [CLS], sentinels...)."""
        return np.array([self._sp.is_control(i) for i in range(self.vocab_size)])

    def word_start_mask(self) -> np.ndarray:
        """[vocab] bool: pieces that begin a word (start with a space, or are a line break)."""
        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        return np.array([p.startswith(WORD_START) or p == NEWLINE for p in pieces])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of `text` as int32; a very long text is encoded in line-aligned chunks, which gives
        the same ids as one call (pieces never cross a line break) in bounded memory."""
        if len(text) <= ENCODE_CHUNK_CHARS:
            return self._sp.encode(text, return_type="numpy")
        return np.concatenate([self._sp.encode(chunk, return_type="numpy")
                               for chunk in _chunks(text, ENCODE_CHUNK_CHARS)])

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
        document's bytes are the sum over its ids minus 1 (see train/evaluation/evaluate.py).
        """
        sp = self._sp

        def size(i: int) -> int:
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                return 0
            if sp.is_byte(i):
                return 1
            return len(sp.id_to_piece(i).replace(WORD_START, " ").encode("utf-8"))

        return np.array([size(i) for i in range(self.vocab_size)], np.int32)

    @functools.cached_property
    def adds_dummy_prefix(self) -> bool:
        """Whether encoding prepends a space marker that decoding removes again (read from the
        model proto once: scoring asks for every row)."""
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(self.model_proto)
        return model.normalizer_spec.add_dummy_prefix

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.model_proto)
        os.replace(tmp, path)


def check_tokenizer(tokenizer: Tokenizer, expected_fingerprint: str, where: str) -> None:
    """A vocabulary other than the one `where` was made with is an error, not a silent switch."""
    if expected_fingerprint and expected_fingerprint != tokenizer.fingerprint:
        raise DataError(
            f"{where} was made with tokenizer {expected_fingerprint}, but {tokenizer.source} is "
            f"{tokenizer.fingerprint}; restore the run's original tokenizer.model (or use a new "
            "--workdir)")


def _chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of at most `size` characters of `text`."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):        # after a line break, else before a space, else anywhere
            newline, space = text.rfind(NEWLINE, start, end), text.rfind(" ", start + 1, end)
            end = newline + 1 if newline >= start else space if space > start else end
        yield text[start:end]
        start = end


def _lines(texts: Iterable[str], max_chars: int, max_line: int) -> Iterator[str]:
    """Non-empty lines of the first `max_chars` characters of `texts`."""
    seen = 0
    for text in texts:
        for line in text.split(NEWLINE):
            if line.strip() and len(line.encode()) < max_line:
                yield line
                seen += len(line)
                if seen >= max_chars:
                    return


MODEL_TYPES = ("unigram", "bpe")
DEFAULTS = base_config().data.tokenizer    # configs/base.py states the defaults once


def check_settings(vocab_size: int, model_type: str, character_coverage: float,
                   prefix: str = "tokenizer ") -> None:
    """The training settings `train` accepts; checked before any text is read. `prefix` names
    where they were set (a config run passes "data.tokenizer.")."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"{prefix}model_type={model_type!r}: choose one of {MODEL_TYPES}")
    if not 0.9 <= character_coverage <= 1.0:
        raise DataError(f"{prefix}character_coverage={character_coverage} must be in [0.9, 1] "
                        "(1.0 for CJK)")
    minimum = 4 + 1 + len(CONTROL_PIECES) + 256 + 16  # ids 0-3, specials, bytes, a few pieces
    if vocab_size < minimum:
        raise DataError(f"{prefix}vocab_size={vocab_size} is too small: the special tokens and "
                        f"byte fallback alone need {minimum - 16}; use at least {minimum}")


def train(texts: Iterable[str], *, vocab_size: int, model_type: str = DEFAULTS.model_type,
          max_chars: int = DEFAULTS.sample_chars,
          character_coverage: float = DEFAULTS.character_coverage,
          num_threads: int | None = None) -> Tokenizer:
    """Trains a sentencepiece model on a bounded sample of `texts`.

    `character_coverage` is the share of characters that get pieces of their own; the rest fall
    back to bytes. 1.0 keeps every character of a CJK corpus whole; 0.9995 suits alphabets.
    """
    check_settings(vocab_size, model_type, character_coverage)
    max_line = 1 << 14
    sample = _lines(texts, max_chars, max_line)
    first = next(sample, None)
    if first is None:
        raise DataError("the tokenizer's training sample is empty: the input has no text")
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_prepend(first, sample), model_writer=writer,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, user_defined_symbols=[NEWLINE],
            control_symbols=list(CONTROL_PIECES), normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
            allow_whitespace_only_pieces=True, character_coverage=character_coverage,
            max_sentence_length=max_line, hard_vocab_limit=False, minloglevel=2,
            num_threads=num_threads or min(16, os.cpu_count() or 1))
    except RuntimeError as e:
        raise DataError(f"training the tokenizer failed: {e}") from e
    return Tokenizer(writer.getvalue(), f"<trained: {model_type}, {vocab_size}>")


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def input_texts(spec: str, *, text_field: str = "text", data_dir: str | None = None,
                split: str = "train", seed: int = 0) -> Iterator[str]:
    """Cleaned documents of `spec` in a seeded random order: a glob of local files, or the name
    of a tfds dataset prepared in `data_dir`."""
    from data import builder, cleaning, sources   # deferred: tfds loads only for this CLI
    clean = cleaning.CleanConfig.create()
    files = sources.expand([spec])
    if files:
        order = np.random.default_rng(seed).permutation(len(files))
        docs = (text for i in order for _, text in sources.text_files([files[i]], text_field))
    else:
        try:
            docs = builder.tfds_texts(spec, split, text_field, data_dir, seed)
        except DataError as e:
            raise DataError(f"--input {spec!r} matches no files; as a tfds dataset: {e}") from e
    return (t for t in map(clean.text, docs) if t.strip())


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer",
                                     description="Train a Loom sentencepiece vocabulary.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a vocabulary on a bounded sample of a corpus")
    p.add_argument("--input", required=True,
                   help="glob of .txt/.jsonl/source files, or a tfds dataset name in --data-dir")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=MODEL_TYPES, default=DEFAULTS.model_type)
    p.add_argument("--out", required=True, help=f"directory to write {MODEL_FILE} into")
    p.add_argument("--character-coverage", type=float, default=DEFAULTS.character_coverage,
                   help="share of characters kept whole (1.0 for CJK); the rest become bytes")
    p.add_argument("--sample-chars", type=int, default=DEFAULTS.sample_chars,
                   help="characters of the corpus to train on")
    p.add_argument("--text-field", default=base_config().data.text_field,
                   help=".jsonl field / tfds feature of the text")
    p.add_argument("--split", default="train", help="tfds split to sample")
    p.add_argument("--data-dir", default=None, help="tfds data dir of a named dataset")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with fail_cleanly(args.verbose):
        tokenizer = train(input_texts(args.input, text_field=args.text_field,
                                      data_dir=args.data_dir, split=args.split),
                          vocab_size=args.vocab_size, model_type=args.model_type,
                          max_chars=args.sample_chars,
                          character_coverage=args.character_coverage)
        out = Path(args.out).expanduser() / MODEL_FILE
        tokenizer.save(out)
    print(f"wrote {out}: {tokenizer.vocab_size} pieces, fingerprint {tokenizer.fingerprint}")


if __name__ == "__main__":
    main()
