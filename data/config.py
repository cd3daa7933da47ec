"""The `data` section of a config, checked once: every data key that can be checked without
reading any data, so a bad value fails before a corpus is prepared or a tokenizer trained."""
from __future__ import annotations

from typing import Any, Mapping

from data import masking, mixture, span_corruption, tokenizer
from data.cleaning import CleanConfig
from errors import DataError

def target_length(data_cfg: Mapping[str, Any], objective: str) -> int:
    """Decoder length S of the encoder-decoder objectives (data.target_len, or derived)."""
    seq_len, configured = data_cfg["seq_len"], data_cfg["target_len"]
    if objective == "prefix_lm":
        return configured or seq_len
    _, needed = span_corruption.chunk_and_target_lengths(
        seq_len, span_corruption.SpanConfig.from_mapping(data_cfg["spans"]))
    if configured and configured < needed:
        raise DataError(f"data.target_len={configured} is too short for span corruption of "
                        f"data.seq_len={seq_len} (it needs {needed}); set it to 0 (automatic)")
    return configured or needed


def check(data_cfg: Mapping[str, Any], objective: str) -> None:
    """Raises DataError for the first data key (or pair of keys) that cannot work."""
    mixture.sources(data_cfg)
    CleanConfig.from_mapping(data_cfg["clean"])
    masking.MaskConfig.from_mapping(data_cfg["mlm"])
    span_corruption.SpanConfig.from_mapping(data_cfg["spans"])
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
    if not 0 <= data_cfg["validation_percent"] < 100:
        raise DataError("data.validation_percent must be in [0, 100), got "
                        f"{data_cfg['validation_percent']}")
    for key in ("train_split", "eval_split"):
        if not data_cfg[key]:
            raise DataError(f"data.{key} must name a split, e.g. train or validation")
    tok = data_cfg["tokenizer"]
    if not tok["path"]:     # a tokenizer will be trained: its settings must work
        try:
            tokenizer.check_settings(tok["vocab_size"], tok["model_type"],
                                     tok["character_coverage"])
        except DataError as e:
            raise DataError(f"data.{e}") from None
        if tok["sample_chars"] <= 0:
            raise DataError(f"data.tokenizer.sample_chars must be positive, got "
                            f"{tok['sample_chars']}")
    if objective in ("span_corruption", "prefix_lm"):
        target_length(data_cfg, objective)
