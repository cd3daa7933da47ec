"""Zero-shot scoring of (context, continuation) pairs from a JSONL file, the way log-likelihood
benchmarks (HellaSwag, PIQA, ARC, LAMBADA, ...) score a language model. One item per line:

    {"context": "The capital of France is", "continuations": [" Paris", " Rome"], "label": 0}
    {"context": "He opened the door and", "continuation": " left"}   # one continuation

A continuation's log-likelihood is log p(continuation | context), summed over its tokens. The
pair is tokenised as one text, [BOS] + encode(context + continuation), so the pieces at the seam
are the ones training saw; the scored tokens are those covering continuation bytes (a piece
straddling the seam counts as continuation). Context tokens beyond model.max_len are dropped
from the left.

Metrics over the items:
  accuracy            the continuation with the highest log-likelihood is the label
  accuracy_per_token  the same after dividing each log-likelihood by its number of tokens
  accuracy_per_byte   ... by the UTF-8 bytes of the continuation (lm-evaluation-harness's
                      acc_norm divides by characters; bytes are the same for ASCII text)
  loglik              mean log-likelihood of the labelled (or only) continuation
  bits_per_byte       -(sum of those log-likelihoods) / ln 2 / (sum of their bytes)
  greedy_match        the labelled continuation is what greedy decoding would produce
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from errors import DataError
from data.tokenizer import BOS, Tokenizer


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    continuations: tuple[str, ...]
    label: int | None           # None: a single continuation, scored but not chosen among
    where: str                  # file:line, for messages


def read_items(path: str | Path) -> list[Item]:
    """The items of a JSONL file; a malformed line is a DataError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"choices file {path} does not exist")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            items.append(_item(line, f"{path}:{number}"))
    if not items:
        raise DataError(f"{path} holds no items (one JSON object per line)")
    return items


def _item(line: str, where: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("context"), str):
        raise DataError(f"{where} needs a \"context\" string (with \"continuations\" and "
                        "\"label\", or one \"continuation\")")
    if "continuation" in record:
        continuations, label = (record["continuation"],), None
    else:
        continuations, label = record.get("continuations"), record.get("label")
        if not isinstance(continuations, list) or len(continuations) < 2:
            raise DataError(f"{where}: \"continuations\" must be a list of at least 2 strings")
        if not isinstance(label, int) or not 0 <= label < len(continuations):
            raise DataError(f"{where}: \"label\" must be the index of the right continuation "
                            f"(0..{len(continuations) - 1}), got {label!r}")
    if not all(isinstance(c, str) and c for c in continuations):
        raise DataError(f"{where}: continuations must be non-empty strings")
    return Item(record["context"], tuple(continuations), label, where)


@dataclasses.dataclass(frozen=True)
class Row:
    tokens: tuple[int, ...]     # [BOS] + context + continuation pieces (maybe left-truncated)
    scored: int                 # the last `scored` tokens are the continuation


def to_row(tokenizer: Tokenizer, context: str, continuation: str, max_len: int,
           where: str) -> Row:
    """The tokens of one (context, continuation) pair and how many of them are scored."""
    spans = tokenizer.encode_spans(context + continuation)
    seam = len(context.encode("utf-8"))
    first = next(i for i, (_, begin, end) in enumerate(spans) if begin >= seam or end > seam)
    tokens = (BOS,) + tuple(i for i, _, _ in spans)
    scored = len(spans) - first
    if scored > max_len:
        raise DataError(f"{where}: a continuation of {scored} tokens does not fit the model's "
                        f"{max_len}-token context")
    return Row(tokens[-(max_len + 1):], scored)


@dataclasses.dataclass(frozen=True)
class Scores:
    """One item: per continuation, its log-likelihood, tokens, bytes and greedy match."""
    loglik: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray
    greedy: np.ndarray
    label: int | None


def _width(length: int, max_len: int) -> int:
    """Rows are padded to a power of two (at least 16), so few shapes compile."""
    return min(max(16, 1 << (length - 1).bit_length()), max_len)


def _batch(rows: Sequence[Row], size: int, width: int) -> dict[str, np.ndarray]:
    inputs = np.zeros((size, width), np.int32)
    targets, segments, weights = np.zeros_like(inputs), np.zeros_like(inputs), \
        np.zeros((size, width), np.float32)
    for r, row in enumerate(rows):
        n = len(row.tokens) - 1
        inputs[r, :n], targets[r, :n], segments[r, :n] = row.tokens[:-1], row.tokens[1:], 1
        weights[r, n - row.scored:n] = 1.0
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (size, width)).copy()
    return {"inputs": inputs, "targets": targets, "positions": positions * segments,
            "segment_ids": segments, "weights": weights}


def _row_scorer(setup) -> Any:
    """Jitted (params, batch) -> per-row summed log-likelihood of the weighted targets and
    whether each of them is the argmax."""
    model = setup.model

    def score(params, batch):
        logits_BxTxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                   batch["segment_ids"]).astype(jnp.float32)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        target_BxT = jnp.take_along_axis(logp_BxTxV, batch["targets"][..., None], -1)[..., 0]
        scored_BxT = batch["weights"] > 0
        hit_BxT = jnp.argmax(logits_BxTxV, -1) == batch["targets"]
        return {"loglik": jnp.sum(jnp.where(scored_BxT, target_BxT, 0.0), axis=1),
                "greedy": jnp.all(hit_BxT | ~scored_BxT, axis=1)}

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(score, in_shardings=(setup.state_shardings.params, setup.batch_sharding),
                   out_shardings=replicated)


def score_items(restored, items: Sequence[Item]) -> list[Scores]:
    """Scores of every item's continuations under a restored run (train/restore.py), in
    batches of data.batch_size rows on its mesh. Call inside its `activate(mesh, rules)`."""
    setup, tokenizer = restored.setup, restored.tokenizer
    max_len, size = setup.model_cfg.max_len, setup.config.data.batch_size
    rows = [to_row(tokenizer, item.context, c, max_len, item.where)
            for item in items for c in item.continuations]
    scorer = _row_scorer(setup)
    loglik, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens))  # similar widths batch
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        width = _width(max(len(rows[r].tokens) - 1 for r in chunk), max_len)
        batch = {k: jax.make_array_from_callback(v.shape, setup.batch_sharding,
                                                 lambda index, v=v: v[index])
                 for k, v in _batch([rows[r] for r in chunk], size, width).items()}
        out = jax.device_get(scorer(restored.params, batch))
        loglik[chunk], greedy[chunk] = out["loglik"][:len(chunk)], out["greedy"][:len(chunk)]
    scores, r = [], 0
    for item in items:
        k = len(item.continuations)
        scores.append(Scores(
            loglik=loglik[r:r + k], tokens=np.array([rows[i].scored for i in range(r, r + k)]),
            bytes=np.array([len(c.encode("utf-8")) for c in item.continuations]),
            greedy=greedy[r:r + k], label=item.label))
        r += k
    return scores


def summarize(scores: Sequence[Scores]) -> dict[str, float]:
    """The metrics of the module docstring."""
    out: dict[str, float] = {"items": len(scores)}
    labelled = [s for s in scores if s.label is not None]
    if labelled:
        for name, norm in (("accuracy", None), ("accuracy_per_token", "tokens"),
                           ("accuracy_per_byte", "bytes")):
            out[name] = float(np.mean([
                np.argmax(s.loglik / (getattr(s, norm) if norm else 1)) == s.label
                for s in labelled]))
    chosen = [s.label or 0 for s in scores]
    logliks = np.array([s.loglik[c] for s, c in zip(scores, chosen)])
    n_bytes = sum(int(s.bytes[c]) for s, c in zip(scores, chosen))
    out.update(loglik=float(np.mean(logliks)),
               bits_per_byte=float(-np.sum(logliks) / math.log(2) / n_bytes),
               greedy_match=float(np.mean([s.greedy[c] for s, c in zip(scores, chosen)])))
    return out
