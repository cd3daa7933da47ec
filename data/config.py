"""The `data` section of a config, checked once: every data key that can be checked without
reading any data, so a bad value fails before a corpus is prepared or a tokenizer trained."""
from __future__ import annotations

from typing import Any, Mapping

from configs.loader import flat_items, number_problem
from data import derived, masking, mixture, noise, plm, span_corruption, tasks, tokenizer
from data.cleaning import CleanConfig
from errors import DataError


def target_length(data_cfg: Mapping[str, Any], objective: str) -> int:
    """Decoder length S of the rows of an encoder-decoder objective (data.target_len, or
    derived); 0 for the objectives whose rows have no decoder side."""
    seq_len, configured = data_cfg["seq_len"], data_cfg["target_len"]
    if objective not in ("span_corruption", "prefix_lm", "denoise"):
        return 0
    if objective == "denoise":   # the target is the text, the input about as long
        if configured > seq_len:
            raise DataError(f"data.target_len={configured} exceeds data.seq_len={seq_len}: a "
                            "denoised input is about as long as its target; set it <= seq_len "
                            "(0 = seq_len)")
        return configured or seq_len
    if objective == "prefix_lm":
        return configured or seq_len
    _, needed = span_corruption.chunk_and_target_lengths(
        seq_len, span_corruption.SpanConfig.from_mapping(data_cfg["spans"]))
    if configured and configured < needed:
        raise DataError(f"data.target_len={configured} is too short for span corruption of "
                        f"data.seq_len={seq_len} (it needs {needed}); set it to 0 (automatic)")
    return configured or needed


# Rows longer than this are no working setting (and make the span-corruption length search slow).
MAX_SEQ_LEN = 1 << 24
MAX_WORKERS = 1024


def check(data_cfg: Mapping[str, Any], objective: str) -> None:
    """Raises DataError for the first data key (or pair of keys) that cannot work."""
    for key, value in flat_items(data_cfg, "data."):
        problem = number_problem(key, value)
        if problem:
            raise DataError(problem)
    mixture.sources(data_cfg)
    if not data_cfg["text_field"]:
        raise DataError("data.text_field must name the feature (or .jsonl key) holding the "
                        "text, e.g. text")
    CleanConfig.from_mapping(data_cfg["clean"])
    masking.MaskConfig.from_mapping(data_cfg["mlm"])
    span_corruption.SpanConfig.from_mapping(data_cfg["spans"])
    _check_noise(data_cfg, objective)
    for key in ("seq_len", "batch_size"):
        if data_cfg[key] <= 0:
            raise DataError(f"data.{key} must be positive, got {data_cfg[key]}")
    for key in ("num_epochs", "target_len", "worker_count", "max_docs", "shuffle_seed"):
        if data_cfg[key] < 0:
            raise DataError(f"data.{key} must be >= 0, got {data_cfg[key]}")
    for key in ("interleave", "shuffle_window"):
        if data_cfg[key] < 1:
            raise DataError(f"data.{key} must be >= 1, got {data_cfg[key]}")
    if data_cfg["seq_len"] < 8:
        raise DataError(f"data.seq_len={data_cfg['seq_len']} is too short; use at least 8")
    for key in ("seq_len", "target_len"):
        if data_cfg[key] > MAX_SEQ_LEN:
            raise DataError(f"data.{key}={data_cfg[key]} is beyond {MAX_SEQ_LEN} tokens a row; "
                            "use a shorter length")
    if data_cfg["worker_count"] > MAX_WORKERS:
        raise DataError(f"data.worker_count={data_cfg['worker_count']} grain processes is more "
                        f"than any host runs (at most {MAX_WORKERS}); 0 = in-process")
    if not 0 <= data_cfg["validation_percent"] < 100:
        raise DataError("data.validation_percent must be in [0, 100), got "
                        f"{data_cfg['validation_percent']}")
    for key in ("train_split", "eval_split"):
        if not data_cfg[key]:
            raise DataError(f"data.{key} must name a split, e.g. train or validation")
    _check_tokenizer(data_cfg["tokenizer"])
    target_length(data_cfg, objective)
    if "plm" in data_cfg:   # a config saved before data.plm existed still restores
        plm_cfg = plm.PlmConfig.from_mapping(data_cfg["plm"])
        if objective == "plm":
            plm_cfg.check_length(data_cfg["seq_len"])
    _check_task(data_cfg, objective)


def _check_noise(data_cfg: Mapping[str, Any], objective: str) -> None:
    """The data.noise section (any objective: a bad value never waits); denoising needs noise."""
    cfg = noise.NoiseConfig.from_mapping(data_cfg["noise"])
    if objective == "denoise" and not cfg.any:
        raise DataError("train.objective=denoise with every data.noise rate at 0 only copies its "
                        "input; set one, e.g. data.noise.infill_rate=0.3")


def _check_task(data_cfg: Mapping[str, Any], objective: str) -> None:
    """Labelled-task objectives read labelled sources, and those only feed them."""
    task = data_cfg["task"]
    if task["layout"] not in ("auto",) + tasks.LAYOUTS:
        raise DataError(f"data.task.layout={task['layout']!r}: choose one of "
                        f"{('auto',) + tasks.LAYOUTS}")
    if task["derived"] not in derived.DERIVED:
        raise DataError(f"data.task.derived={task['derived']!r}: choose one of {derived.DERIVED}")
    kinds = {s.kind for s in mixture.sources(data_cfg)}
    if objective in tasks.TASKS:
        if not kinds <= set(mixture.TASK_KINDS):
            raise DataError(f"train.objective={objective} reads labelled records: set "
                            "data.source=task_files (data.paths) or stdlib_task, not "
                            f"{sorted(kinds)}")
        if data_cfg["source"] == "stdlib_task" and derived.TASK_OF[task["derived"]] != objective:
            raise DataError(f"data.task.derived={task['derived']} is a "
                            f"{derived.TASK_OF[task['derived']]} task, not {objective}; choose "
                            f"one of {[d for d, t in derived.TASK_OF.items() if t == objective]}")
    elif kinds & set(mixture.TASK_KINDS):
        raise DataError(f"data.source={data_cfg['source']} holds labelled records for the task "
                        f"objectives {tasks.TASKS}, not train.objective={objective}")
    if data_cfg["eval_paths"] and data_cfg["source"] != "task_files":
        raise DataError("data.eval_paths are for data.source=task_files")


def _check_tokenizer(tok: Mapping[str, Any]) -> None:
    """The settings of training a tokenizer, checked even when data.tokenizer.path names one,
    so a wrong value never waits for the run that trains."""
    tokenizer.check_settings(tok["vocab_size"], tok["model_type"], tok["character_coverage"],
                             prefix="data.tokenizer.")
    if tok["sample_chars"] <= 0:
        raise DataError(f"data.tokenizer.sample_chars must be positive, got {tok['sample_chars']}")
