"""Sentence pairs for next-sentence prediction (BERT's NSP) and sentence-order prediction (SOP).

A document is cut into sentences (line breaks and sentence-final punctuation), and consecutive
sentences are gathered into chunks of about `max_tokens`, as in BERT's create_pretraining_data.
Each chunk is cut at a random sentence into A and B. NSP: half the time B is replaced by a
span of a random other document (label 0), and the sentences it displaced start the next chunk.
SOP: half the time A and B swap places (label 0). Label 1 means true next / right order.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import numpy as np

from data.tokenizer import Tokenizer

# Inside a line, a sentence ends after . ! ? followed by a space (which starts the next one, as
# it starts a word's piece, so sentences encode to the same ids as the whole line) or after
# their CJK forms.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?= )|(?<=[\u3002\uff01\uff1f])")
Pair = tuple[np.ndarray, np.ndarray, int]


def sentences(text: str) -> list[str]:
    """Consecutive sentences (lines, and sentences within long lines) whose concatenation is
    `text`; blank ones join their neighbour."""
    out: list[str] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        line = line + "\n" if i < len(lines) - 1 else line
        for part in _SENTENCE_END.split(line) if len(line) > 80 else (line,):
            if not part:
                continue
            if out and (not part.strip() or not out[-1].strip()):
                out[-1] += part
            else:
                out.append(part)
    return out


def _truncate(a: np.ndarray, b: np.ndarray, max_tokens: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trims the longer segment until the pair fits (as BERT does token by token), each trimmed
    token coming off the front or the back at random."""
    la, lb = len(a), len(b)
    while la + lb > max_tokens:            # a few steps: jump the longer down to the shorter
        if la >= lb:
            la = max(lb, max_tokens - lb) if la > lb else la - 1
        else:
            lb = max(la, max_tokens - la)

    def trim(x: np.ndarray, keep: int) -> np.ndarray:
        front = int(rng.binomial(len(x) - keep, 0.5))
        return x[front:front + keep]

    return trim(a, la), trim(b, lb)


def random_span(text: str, tokenizer: Tokenizer, n_tokens: int,
                rng: np.random.Generator) -> np.ndarray:
    """About `n_tokens` tokens of `text`, from the start of a random line on."""
    start = int(rng.integers(len(text))) if text else 0
    start = text.find("\n", start) + 1 if text.find("\n", start) >= 0 else 0
    window = text[start:start + 16 * n_tokens] or text[:16 * n_tokens]
    return tokenizer.encode_array(window)[:n_tokens]


def pairs(text: str, tokenizer: Tokenizer, mode: str, max_tokens: int, rng: np.random.Generator,
          partner: Callable[[np.random.Generator], str] | None) -> Iterator[Pair]:
    """(A ids, B ids, label) pairs of one document with len(A) + len(B) <= max_tokens.

    mode "nsp" needs `partner(rng)`: the text of a random other document.
    """
    sent_ids = [tokenizer.encode_array(s) for s in sentences(text)]
    sent_ids = [s for s in sent_ids if len(s)]
    i, chunk, length = 0, [], 0
    while i < len(sent_ids):
        chunk.append(sent_ids[i])
        length += len(sent_ids[i])
        if i == len(sent_ids) - 1 or length >= max_tokens:
            whole = len(chunk) > 1
            if not whole:                  # one long sentence: cut it inside instead
                if len(chunk[0]) < 2:
                    chunk, length, i = [], 0, i + 1
                    continue
                cut = int(rng.integers(1, len(chunk[0])))
                chunk = [chunk[0][:cut], chunk[0][cut:]]
            a_end = int(rng.integers(1, len(chunk)))
            a = np.concatenate(chunk[:a_end])
            b = np.concatenate(chunk[a_end:])
            label = 1
            if mode == "nsp" and rng.random() < 0.5:
                assert partner is not None, "NSP pairs need a partner document"
                other = random_span(partner(rng), tokenizer, max(1, max_tokens - len(a)), rng)
                if len(other):
                    b, label = other, 0
                    if whole:               # the displaced sentences start the next chunk
                        i -= len(chunk) - a_end
            elif mode == "sop" and rng.random() < 0.5:
                a, b, label = b, a, 0
            a, b = _truncate(a, b, max_tokens, rng)
            if len(a) and len(b):
                yield a.astype(np.int32), b.astype(np.int32), label
            chunk, length = [], 0
        i += 1
