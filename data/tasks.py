"""Labelled tasks: records, label maps and the rows of the task objectives.

Records are JSON objects (data/sources.py `task_files`: JSONL lines or CoNLL sentences; or
data/derived.py), each with `_where` (file:line) for error messages:

  classify   {"text": str, "label": str|int, "text_pair": str (optional)}
  tag        {"tokens": [str, ...], "tags": [str, ...]}   (BIO/IOB2 tags, one per token)
  text2text  {"input": str, "target": str}

Labels are strings (ints are written as strings); the label set is the sorted set of the train
split's labels (`label_set`), stored in the run's config as data.task.labels, and every other
split must use only those (`check_labels`).

Rows (one example per row, padded; the layouts of train/objectives.py) depend on
data.task.layout, which the family decides (train/families.py):

  cls      [CLS] text [SEP] (pair [SEP]); classify/tag pool or label these tokens
  causal   [BOS] text ...; text2text: [BOS] input "\\n" target [EOS], loss on target + [EOS]
  seq2seq  text [EOS] into the encoder; text2text decodes [BOS] target -> target [EOS]

classify rows: inputs, positions, segment_ids (1 real, 0 pad), type_ids [T]; labels [] and
label_weights [] (float32). tag rows: the same token arrays, tags [T] (the word's tag id on the
first piece of each word, 0 elsewhere) and tag_weights [T] (1.0 on those first pieces).
text2text rows: clm's layout (causal) or span_corruption's (seq2seq).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import numpy as np

from data.packing import Doc
from data.tokenizer import BOS, CLS, EOS, SEP, Tokenizer
from errors import DataError

TASKS = ("classify", "tag", "text2text")
LAYOUTS = ("cls", "causal", "seq2seq")
FIELDS = {"classify": ("text", "label"), "tag": ("tokens", "tags"),
          "text2text": ("input", "target")}
PROMPT_END = "\n"   # causal text2text: the prompt is input + PROMPT_END


def parse(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"a task record is not JSON ({e.msg}): {text[:80]!r}; task data comes "
                        "from data.source=task_files or stdlib_task") from e
    if not isinstance(record, dict):
        raise DataError(f"a task record is not a JSON object: {text[:80]!r}")
    return record


def check_record(record: Mapping[str, Any], task: str) -> None:
    """A DataError naming the record's file:line for a missing or malformed field."""
    where = record.get("_where", "a record")
    for field in FIELDS[task]:
        if field not in record:
            raise DataError(f"{where} has no field {field!r}, which a {task} task needs "
                            f"(fields: {', '.join(FIELDS[task])}); its fields are "
                            f"{sorted(k for k in record if k != '_where')}")
    if task == "tag":
        tokens, tags = record["tokens"], record["tags"]
        if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
            raise DataError(f"{where}: 'tokens' and 'tags' must be lists of equal length")


def labels_of(record: Mapping[str, Any], task: str) -> list[str]:
    if task == "classify":
        return [str(record["label"])]
    if task == "tag":
        return [str(t) for t in record["tags"]]
    return []


def label_set(records: Sequence[Mapping[str, Any]], task: str) -> tuple[str, ...]:
    """The sorted labels of the (train) records; "O" first for tagging, so id 0 is outside."""
    found = set()
    for record in records:
        check_record(record, task)
        found.update(labels_of(record, task))
    if task == "tag":
        return ("O",) + tuple(sorted(found - {"O"}))
    return tuple(sorted(found))


def check_labels(records: Sequence[Mapping[str, Any]], task: str, labels: Sequence[str],
                 split: str) -> None:
    known = set(labels)
    for record in records:
        check_record(record, task)
        unknown = [x for x in labels_of(record, task) if x not in known]
        if unknown:
            raise DataError(f"{record.get('_where', 'a record')} ({split} split) has label "
                            f"{unknown[0]!r}, which the train split does not have (its labels: "
                            f"{', '.join(labels)}); fix the file or add examples of it to the "
                            "train data")


@dataclasses.dataclass(frozen=True)
class TaskRows:
    """Doc (a record's JSON) -> one padded row of `task` (see the module docstring)."""
    task: str
    tokenizer: Tokenizer
    layout: str
    labels: tuple[str, ...]
    seq_len: int
    target_len: int

    def __call__(self, doc: Doc | str) -> dict[str, np.ndarray]:
        record = parse(doc.text if isinstance(doc, Doc) else doc)
        check_record(record, self.task)
        row = getattr(self, f"_{self.task}")(record)
        if isinstance(doc, Doc):
            row["epoch"] = np.int32(doc.epoch)
        return row

    def _label_id(self, label: str, record) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise DataError(f"{record.get('_where', 'a record')} has label {label!r}, which the "
                            f"train split does not have (its labels: {', '.join(self.labels)})"
                            ) from None

    def _frame(self) -> tuple[list[int], list[int]]:
        """Tokens before and after the text: [CLS] .. [SEP], [BOS] .., or .. [EOS]."""
        if self.layout == "cls":
            return [self.tokenizer.piece_id(CLS)], [self.tokenizer.piece_id(SEP)]
        if self.layout == "causal":
            return [BOS], []
        return [], [EOS]

    def _padded(self, ids: list[int], types: list[int]) -> dict[str, np.ndarray]:
        n, t = len(ids), self.seq_len
        out = {"inputs": np.zeros(t, np.int32), "positions": np.zeros(t, np.int32),
               "segment_ids": np.zeros(t, np.int32), "type_ids": np.zeros(t, np.int32)}
        out["inputs"][:n] = ids
        out["positions"][:n] = np.arange(n)
        out["segment_ids"][:n] = 1
        out["type_ids"][:n] = types
        return out

    def _classify(self, record) -> dict[str, np.ndarray]:
        head, tail = self._frame()
        room = self.seq_len - len(head) - len(tail)
        first = self.tokenizer.encode(str(record["text"]))
        second = []
        if record.get("text_pair") is not None:
            second = [self.tokenizer.piece_id(SEP)] + self.tokenizer.encode(
                str(record["text_pair"]))
            second = second[:max(room // 2, room - len(first))]
        first = first[:room - len(second)]
        ids = head + first + second + tail
        types = [0] * (len(head) + len(first)) + [int(bool(second))] * (len(second) + len(tail))
        row = self._padded(ids, types)
        row["labels"] = np.int32(self._label_id(str(record["label"]), record))
        row["label_weights"] = np.float32(1.0)
        return row

    def word_pieces(self, tokens: Sequence[str]) -> list[list[int]]:
        """Pieces of each word: words after the first are encoded with their leading space
        (the vocabulary has no dummy prefix)."""
        return [self.tokenizer.encode(w if i == 0 else " " + w) or [self.tokenizer.piece_id(SEP)]
                for i, w in enumerate(tokens)]

    def _tag(self, record) -> dict[str, np.ndarray]:
        head, tail = self._frame()
        room = self.seq_len - len(head) - len(tail)
        ids, firsts, tag_ids = list(head), [], []
        for word, tag in zip(self.word_pieces(record["tokens"]), record["tags"]):
            if len(ids) - len(head) + len(word) > room:
                break     # words past seq_len are left out (and out of the metrics)
            firsts.append(len(ids))
            tag_ids.append(self._label_id(str(tag), record))
            ids += word
        ids += tail
        row = self._padded(ids, [0] * len(ids))
        row["tags"] = np.zeros(self.seq_len, np.int32)
        row["tag_weights"] = np.zeros(self.seq_len, np.float32)
        row["tags"][firsts] = tag_ids
        row["tag_weights"][firsts] = 1.0
        return row

    def _text2text(self, record) -> dict[str, np.ndarray]:
        source = self.tokenizer.encode(str(record["input"]))
        target = self.tokenizer.encode(str(record["target"]))
        if self.layout == "seq2seq":
            return _seq2seq_row(source, target, self.seq_len, self.target_len)
        prompt = self.tokenizer.encode(str(record["input"]) + PROMPT_END)
        t = self.seq_len
        target = (target + [EOS])[:t // 2]
        prompt = [BOS] + prompt[:t + 1 - len(target) - 1]
        seq = prompt + target
        n = len(seq) - 1     # tokens in, each predicting the next
        out = {"inputs": np.zeros(t, np.int32), "targets": np.zeros(t, np.int32),
               "positions": np.zeros(t, np.int32), "segment_ids": np.zeros(t, np.int32),
               "weights": np.zeros(t, np.float32)}
        out["inputs"][:n] = seq[:-1]
        out["targets"][:n] = seq[1:]
        out["positions"][:n] = np.arange(n)
        out["segment_ids"][:n] = 1
        out["weights"][len(prompt) - 1:n] = 1.0
        return out


def _seq2seq_row(source: list[int], target: list[int], seq_len: int, target_len: int
                 ) -> dict[str, np.ndarray]:
    enc = (source[:seq_len - 1] + [EOS])
    dec = (target + [EOS])[:target_len]
    out = {}
    for side, ids, length in (("encoder", enc, seq_len), ("decoder", dec, target_len)):
        out[f"{side}_positions"] = np.zeros(length, np.int32)
        out[f"{side}_segment_ids"] = np.zeros(length, np.int32)
        out[f"{side}_positions"][:len(ids)] = np.arange(len(ids))
        out[f"{side}_segment_ids"][:len(ids)] = 1
    out["encoder_inputs"] = np.zeros(seq_len, np.int32)
    out["encoder_inputs"][:len(enc)] = enc
    out["decoder_targets"] = np.zeros(target_len, np.int32)
    out["decoder_targets"][:len(dec)] = dec
    out["decoder_inputs"] = np.zeros(target_len, np.int32)
    out["decoder_inputs"][:len(dec)] = [BOS] + dec[:-1]
    out["decoder_weights"] = (out["decoder_segment_ids"] > 0).astype(np.float32)
    return out


def task_rows(task: str, tokenizer: Tokenizer, data_cfg: Mapping[str, Any]) -> TaskRows:
    """The row maker of `task` for a data section whose data.task.layout is resolved."""
    layout = data_cfg["task"]["layout"]
    if layout not in LAYOUTS:
        raise DataError(f"data.task.layout={layout!r}: choose one of {LAYOUTS} (auto is "
                        "resolved from model.family before the data pipeline starts)")
    labels = tuple(data_cfg["task"]["labels"])
    if task != "text2text" and not labels:
        raise DataError(f"a {task} task needs data.task.labels; () is resolved from the train "
                        "split when the run starts")
    return TaskRows(task, tokenizer, layout, labels, data_cfg["seq_len"],
                    data_cfg["target_len"] or data_cfg["seq_len"])
