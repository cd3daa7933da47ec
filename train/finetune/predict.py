"""Predictions of a fine-tuned model on a task's split, and the task metrics over them.

One prediction per record: {"input", "gold", "prediction", "score"} — classify: the label and
its probability; tag: the tags of the words that fit in data.seq_len and the mean probability
of the predicted tags; text2text: the greedy generation and its sentence chrF. Metrics:

  classify   accuracy, macro_f1 (mean over the train labels of per-label F1), and per label
             the gold / predicted / correct counts
  tag        entity-level precision / recall / f1 (seqeval, BIO/IOB2), per-type report, and
             word accuracy
  text2text  exact_match, bleu and chrf (sacrebleu, corpus level), rougeL (rouge-score, mean F)

All are in [0, 1] except bleu and chrf (0-100, as sacrebleu reports them).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data import pipeline, tasks as tasks_lib
from data.tokenizer import EOS, Tokenizer
from errors import DataError
from train.decoding import generate
from train.decoding.options import Options
from train.setup import Setup


def records(setup: Setup, split: str, limit: int = 0) -> list[dict[str, Any]]:
    """The split's records (the first `limit`, 0 = all), labels checked against the run's."""
    config = setup.config
    found = pipeline.task_records(config.data, split)
    if limit:
        found = found[:limit]
    if setup.objective.head:
        tasks_lib.check_labels(found, config.train.objective, config.data.task.labels, split)
    return found


@functools.lru_cache(maxsize=8)
def _forward(model, mesh):
    def apply(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                             batch["segment_ids"], batch["type_ids"])
        return jax.nn.softmax(logits, axis=-1)
    # replicated out: with several processes each one reads every prediction
    return jax.jit(apply, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _probabilities(setup: Setup, params: Any, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Label probabilities of each row, in data.batch_size batches (the last one padded). Every
    process computes the same rows together (their batch sharded over the whole mesh) and
    gets all the probabilities, so the task metrics agree across processes."""
    size = setup.config.data.batch_size
    keys = ("inputs", "positions", "segment_ids", "type_ids")
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        chunk = chunk + [chunk[-1]] * (size - len(chunk))
        batch = {k: jax.make_array_from_callback(v.shape, setup.batch_sharding,
                                                 lambda index, v=v: v[index])
                 for k in keys for v in [np.stack([r[k] for r in chunk])]}
        out.append(np.asarray(jax.device_get(_forward(setup.model, setup.mesh)(params, batch))))
    return np.concatenate(out)[:len(rows)]


def predict(setup: Setup, params: Any, tokenizer: Tokenizer, found: Sequence[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """One prediction per record (see the module docstring). Call inside the run's mesh."""
    config, task = setup.config, setup.config.train.objective
    if not found:
        raise DataError("no records to predict")
    make = tasks_lib.task_rows(task, tokenizer, config.data)
    if task == "text2text":
        return _generate(setup, params, tokenizer, found)
    rows = [make(json.dumps(r)) for r in found]
    probs = _probabilities(setup, params, rows)
    labels = config.data.task.labels
    out = []
    for record, row, p in zip(found, rows, probs):
        if task == "classify":
            text = record["text"] if record.get("text_pair") is None else \
                [record["text"], record["text_pair"]]
            k = int(np.argmax(p))
            out.append({"input": text, "gold": str(record["label"]), "prediction": labels[k],
                        "score": float(p[k])})
        else:
            firsts = np.flatnonzero(row["tag_weights"])
            picked = np.argmax(p[firsts], axis=-1)
            n = len(firsts)
            out.append({"input": record["tokens"][:n], "gold": [str(t) for t in
                                                               record["tags"][:n]],
                        "prediction": [labels[i] for i in picked],
                        "score": float(np.mean(np.max(p[firsts], axis=-1))) if n else 0.0})
    return out


def _generate(setup: Setup, params: Any, tokenizer: Tokenizer, found) -> list[dict[str, Any]]:
    import sacrebleu   # deferred: only generation tasks score text
    config = setup.config
    suffix = tasks_lib.PROMPT_END if config.data.task.layout == "causal" else ""
    prompts = [str(r["input"]) + suffix for r in found]
    texts = []
    for start in range(0, len(prompts), config.data.batch_size):
        texts += generate.generate_text(
            setup.model_cfg, params, tokenizer, prompts[start:start + config.data.batch_size],
            max_new_tokens=config.finetune.max_new_tokens, options=Options("greedy"),
            rng=jax.random.PRNGKey(0), stop_ids=(EOS,))
    return [{"input": r["input"], "gold": str(r["target"]), "prediction": t.strip(),
             "score": sacrebleu.sentence_chrf(t.strip(), [str(r["target"])]).score / 100}
            for r, t in zip(found, texts)]


def metrics(task: str, predictions: Sequence[dict[str, Any]],
            labels: Sequence[str] = ()) -> dict[str, Any]:
    """The task metrics of `predictions` (see the module docstring), with their counts."""
    n = len(predictions)
    if task == "classify":
        gold = [p["gold"] for p in predictions]
        pred = [p["prediction"] for p in predictions]
        f1s, per_label = [], {}
        for label in labels or sorted(set(gold)):
            tp = sum(g == label == q for g, q in zip(gold, pred))
            fp = sum(q == label != g for g, q in zip(gold, pred))
            fn = sum(g == label != q for g, q in zip(gold, pred))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
            per_label[label] = {"gold": tp + fn, "predicted": tp + fp, "correct": tp,
                                "f1": f1s[-1]}
        return {"accuracy": sum(g == q for g, q in zip(gold, pred)) / n,
                "macro_f1": float(np.mean(f1s)), "per_label": per_label, "examples": n}
    if task == "tag":
        from seqeval.metrics import classification_report, f1_score, precision_score, \
            recall_score   # deferred: only tagging needs it
        gold = [p["gold"] for p in predictions]
        pred = [p["prediction"] for p in predictions]
        words = sum(len(g) for g in gold)
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
        per_type = {k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                    for k, v in report.items() if not k.endswith(" avg")}
        return {"precision": float(precision_score(gold, pred, zero_division=0)),
                "recall": float(recall_score(gold, pred, zero_division=0)),
                "f1": float(f1_score(gold, pred, zero_division=0)),
                "accuracy": sum(a == b for g, q in zip(gold, pred) for a, b in zip(g, q)) /
                max(words, 1),
                "per_type": per_type, "examples": n, "words": words}
    import sacrebleu
    from rouge_score import rouge_scorer   # deferred: only generation tasks score text
    gold = [p["gold"] for p in predictions]
    pred = [p["prediction"] for p in predictions]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return {"exact_match": sum(g.strip() == q.strip() for g, q in zip(gold, pred)) / n,
            "bleu": sacrebleu.corpus_bleu(pred, [gold]).score,
            "chrf": sacrebleu.corpus_chrf(pred, [gold]).score,
            "rougeL": float(np.mean([scorer.score(g, q)["rougeL"].fmeasure
                                     for g, q in zip(gold, pred)])),
            "examples": n}


def evaluate_task(setup: Setup, params: Any, tokenizer: Tokenizer, split: str,
                  limit: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Task metrics and predictions on `split` (the first `limit` records; 0 = all)."""
    preds = predict(setup, params, tokenizer, records(setup, split, limit))
    return metrics(setup.config.train.objective, preds, setup.config.data.task.labels), preds


def write_predictions(path: str | Path, predictions: Sequence[dict[str, Any]],
                      summary: dict[str, Any]) -> None:
    """One JSON line per example, then the summary as `<path>.summary.json`."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    path.with_suffix(path.suffix + ".summary.json").write_text(json.dumps(summary, indent=1))
