"""Zero-shot scoring of (context, continuation) pairs from a JSONL file, the way log-likelihood
benchmarks (HellaSwag, PIQA, ARC, LAMBADA, ...) score a language model. One item per line:

    {"context": "The capital of France is", "continuations": [" Paris", " Rome"], "label": 0}
    {"context": "He opened the door and", "continuation": " left"}   # one continuation

A continuation's log-likelihood is log p(continuation | context), summed over its tokens. How
the pair enters the model is its family's prompting (train/families.py), as in generation:

  continue  (decoder-only) The pair is tokenised as one text, [BOS] + encode(context +
            continuation), so the pieces at the seam are the ones training saw; the scored tokens
            are those covering continuation bytes (a piece straddling the seam counts as
            continuation). Context tokens beyond model.max_len are dropped from the left.
  encode    (encoder-decoder) The encoder reads encode(context) + [EOS], as in training and
            generation, cut to its last model.max_len tokens (context dropped from the left, EOS
            kept). The decoder is teacher-forced from [BOS] on the continuation tokenised on its
            own, encode(continuation), and every one of those tokens is scored; the EOS that
            would end the output is not (the continuation may be only its beginning). A leading
            space stays in the text: Loom's tokenizers keep whitespace and add no dummy prefix,
            so " Paris" starts with the piece "\u2581Paris", as a prefix-LM target cut before a
            word does. With a tokenizer that adds a dummy prefix, one leading space is dropped
            first, since the prefix stands for it.

Families that write no text (encoder, electra) cannot be scored this way: a ConfigError. A
continuation's tokens are its scored tokens, its bytes the UTF-8 bytes of its text, in both.

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
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data.tokenizer import BOS, EOS, Tokenizer
from errors import ConfigError, DataError
from model.config import ModelConfig
from train import families


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
        raise DataError(f"{where} is not valid JSON ({e.msg})") from e
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


DEMO_SEPARATOR = "\n\n"


def with_shots(items: Sequence[Item], demos: Sequence[Item], shots: int, seed: int = 0
               ) -> list[Item]:
    """k-shot prompting: each item's context after `shots` demonstrations, each a demo's
    context + its labelled (or only) continuation + DEMO_SEPARATOR, drawn without replacement
    by `seed` and the item's index from `demos` (never a demo with the item's own context)."""
    if shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {shots}")
    out = []
    for i, item in enumerate(items):
        pool = [d for d in demos if d.context != item.context]
        if len(pool) < shots:
            raise DataError(f"--shots {shots} needs {shots} demonstrations besides each item, but "
                            f"the demo file has {len(pool)} for {item.where}")
        picked = np.random.default_rng([seed, i]).choice(len(pool), shots, replace=False)
        prefix = "".join(pool[j].context + pool[j].continuations[pool[j].label or 0] +
                         DEMO_SEPARATOR for j in sorted(picked))
        out.append(dataclasses.replace(item, context=prefix + item.context))
    return out


@dataclasses.dataclass(frozen=True)
class Row:
    tokens: tuple[int, ...]     # [BOS] + (context +) continuation pieces (maybe left-truncated)
    scored: int                 # the last `scored` tokens are the continuation
    encoder: tuple[int, ...] = ()   # "encode": context pieces + [EOS]; "continue": none


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


def to_seq2seq_row(tokenizer: Tokenizer, context: str, continuation: str, max_len: int,
                   where: str) -> Row:
    """The encoder tokens of a context and the decoder tokens of a continuation, all of them
    scored, for an encoder-decoder model (see the module docstring)."""
    if tokenizer.adds_dummy_prefix and continuation.startswith(" "):
        continuation = continuation[1:]
    ids = tuple(tokenizer.encode(continuation))
    if not ids:
        raise DataError(f"{where}: the continuation {continuation!r} encodes to no tokens")
    if len(ids) > max_len:
        raise DataError(f"{where}: a continuation of {len(ids)} tokens does not fit the "
                        f"model's {max_len}-token decoder")
    encoder = tuple(tokenizer.encode(context)) + (EOS,)
    return Row((BOS,) + ids, len(ids), encoder[-max_len:])


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


def _positions(segments_BxT: np.ndarray) -> np.ndarray:
    """0, 1, ... along each row's real (left-aligned) tokens, 0 on padding."""
    return np.arange(segments_BxT.shape[1], dtype=np.int32)[None, :] * segments_BxT


def _batch(rows: Sequence[Row], size: int, width: int,
           encoder_width: int = 0) -> dict[str, np.ndarray]:
    """`size` rows (the missing ones padding) in the clm layout of train/objectives.py, or with
    `encoder_width` in the encoder-decoder one (the clm keys become the decoder_ keys)."""
    inputs = np.zeros((size, width), np.int32)
    targets, segments, weights = np.zeros_like(inputs), np.zeros_like(inputs), \
        np.zeros((size, width), np.float32)
    for r, row in enumerate(rows):
        n = len(row.tokens) - 1
        inputs[r, :n], targets[r, :n], segments[r, :n] = row.tokens[:-1], row.tokens[1:], 1
        weights[r, n - row.scored:n] = 1.0
    batch = {"inputs": inputs, "targets": targets, "positions": _positions(segments),
             "segment_ids": segments, "weights": weights}
    if not encoder_width:
        return batch
    encoder = np.zeros((size, encoder_width), np.int32)
    encoder_segments = np.zeros_like(encoder)
    for r, row in enumerate(rows):
        encoder[r, :len(row.encoder)], encoder_segments[r, :len(row.encoder)] = row.encoder, 1
    return {"encoder_inputs": encoder, "encoder_positions": _positions(encoder_segments),
            "encoder_segment_ids": encoder_segments,
            **{f"decoder_{k}": v for k, v in batch.items()}}


def _causal_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return model.apply({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"])


def _seq2seq_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return model.apply({"params": params}, batch["encoder_inputs"], batch["decoder_inputs"],
                       batch["encoder_positions"], batch["encoder_segment_ids"],
                       batch["decoder_positions"], batch["decoder_segment_ids"])


@dataclasses.dataclass(frozen=True)
class Mode:
    """How one prompting mode (train/families.py) scores pairs: the row of a pair, the logits of
    a batch of rows, and the prefix of the batch keys of its scored targets and weights."""
    row: Callable[[Tokenizer, str, str, int, str], Row]
    logits: Callable[[nn.Module, Any, dict[str, jax.Array]], jax.Array]
    scored_keys: str


MODES = {"continue": Mode(to_row, _causal_logits, ""),
         "encode": Mode(to_seq2seq_row, _seq2seq_logits, "decoder_")}
assert set(MODES) == set(families.PROMPTING), "every prompting mode needs a Mode"


def prompting(model: ModelConfig | str) -> str:
    """The prompting mode of a model (or family name) to score it with; a family that writes no
    text is a ConfigError. Cheap: callers can check a run before restoring it."""
    family = families.family(model)
    if family.prompting is None:
        raise ConfigError(f"--choices scores the continuations a model writes, and "
                          f"model.family={family.name!r} writes no text (it predicts or labels "
                          "tokens in place); evaluate its loss on a split with train.eval instead, "
                          "without --choices")
    return family.prompting


def _row_scorer(setup, mode: Mode) -> Any:
    """Jitted (params, batch) -> per-row summed log-likelihood of the weighted targets and
    whether each of them is the argmax."""
    model, key = setup.model, mode.scored_keys

    def score(params, batch):
        logits_BxTxV = mode.logits(model, params, batch).astype(jnp.float32)
        targets_BxT = batch[key + "targets"]
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        target_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], -1)[..., 0]
        scored_BxT = batch[key + "weights"] > 0
        hit_BxT = jnp.argmax(logits_BxTxV, -1) == targets_BxT
        return {"loglik": jnp.sum(jnp.where(scored_BxT, target_BxT, 0.0), axis=1),
                "greedy": jnp.all(hit_BxT | ~scored_BxT, axis=1)}

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(score, in_shardings=(setup.state_shardings.params, setup.batch_sharding),
                   out_shardings=replicated)


def score_items(restored, items: Sequence[Item]) -> list[Scores]:
    """Scores of every item's continuations under a restored run (train/restore.py), in
    batches of data.batch_size rows on its mesh. Call inside its `activate(mesh, rules)`. A
    family that writes no text is a ConfigError (`prompting`), raised before any work."""
    setup, tokenizer = restored.setup, restored.tokenizer
    mode = MODES[prompting(setup.model_cfg)]
    max_len = setup.model_cfg.max_len
    rows = [mode.row(tokenizer, item.context, c, max_len, item.where)
            for item in items for c in item.continuations]
    loglik, greedy = score_rows(restored, rows)
    scores, r = [], 0
    for item in items:
        k = len(item.continuations)
        scores.append(Scores(
            loglik=loglik[r:r + k], tokens=np.array([rows[i].scored for i in range(r, r + k)]),
            bytes=np.array([len(c.encode("utf-8")) for c in item.continuations]),
            greedy=greedy[r:r + k], label=item.label))
        r += k
    return scores


def rolling_rows(restored, text: str) -> list[Row]:
    """The rows that score every token of `text` once, in windows of at most model.max_len
    predicted tokens, as lm-evaluation-harness's `get_rolling_token_windows(...,
    context_len=1)` cuts them: the first window reads [BOS] and the text's first tokens, each
    later one the model.max_len tokens before its end (so a full window has one token of
    context, a last partial one more). An encoder-decoder's decoder scores the windows one by
    one after an empty encoder input, as `--choices` scores an empty context."""
    mode = prompting(restored.setup.model_cfg)
    max_len, tokenizer = restored.setup.model_cfg.max_len, restored.tokenizer
    ids = tuple(tokenizer.encode(text))
    if mode == "encode":
        return [Row((BOS,) + ids[a:a + max_len], len(ids[a:a + max_len]), (EOS,))
                for a in range(0, len(ids), max_len)]
    full, rows = (BOS,) + ids, []
    first = min(max_len, len(ids))
    if first:
        rows.append(Row(full[:first + 1], first))
    done = first
    while done < len(ids):
        end = min(len(ids), done + max_len)
        rows.append(Row(full[end - max_len:end + 1], end - done))
        done = end
    return rows


def score_rows(restored, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the summed log-likelihood of its scored tokens and whether greedy decoding
    would produce them, in batches of data.batch_size rows on the run's mesh."""
    setup = restored.setup
    mode = MODES[prompting(setup.model_cfg)]
    max_len, size = setup.model_cfg.max_len, setup.config.data.batch_size
    scorer = _row_scorer(setup, mode)
    loglik, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    # rows of similar widths share a batch
    order = sorted(range(len(rows)), key=lambda r: (len(rows[r].encoder), len(rows[r].tokens)))
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        width = _width(max(len(rows[r].tokens) - 1 for r in chunk), max_len)
        encoder_len = max(len(rows[r].encoder) for r in chunk)
        encoder_width = _width(encoder_len, max_len) if encoder_len else 0
        batch = {k: jax.make_array_from_callback(v.shape, setup.batch_sharding,
                                                 lambda index, v=v: v[index])
                 for k, v in _batch([rows[r] for r in chunk], size, width,
                                    encoder_width).items()}
        out = jax.device_get(scorer(restored.params, batch))
        loglik[chunk], greedy[chunk] = out["loglik"][:len(chunk)], out["greedy"][:len(chunk)]
    return loglik, greedy


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
