"""python -m data.benchmark --config configs/quickstart.py [--objective clm] [--workers 0,1,2]

Tokens per second through the whole host pipeline (read ArrayRecord, clean, tokenize, build the
objective's examples, pack or pad, shuffle, batch) for each grain worker count, next to the raw
speed of sentencepiece encoding the same split's text in one thread. Tokens are the real
(non-padding) tokens of the rows: encoder plus decoder tokens for encoder-decoder objectives.
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

from configs.loader import parse
from data import config as data_config, pipeline
from data.tokenizer import Tokenizer
from errors import fail_cleanly


def raw_encode_speed(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, max_chars: int,
                     repeats: int = 3) -> dict[str, float]:
    """One-thread sentencepiece speed (ids as numpy, its fastest form) on the first `max_chars`
    of the cleaned train split, per wall-clock and per CPU second."""
    docs, chars = [], 0
    for text in pipeline.documents(data_cfg, data_cfg["train_split"]):
        docs.append(text)
        chars += len(text)
        if chars >= max_chars:
            break
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):       # best of a few: other processes share the CPUs
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = sum(len(tokenizer.encode_array(text)) for text in docs)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"tokens_per_s": tokens / best_wall, "tokens_per_cpu_s": tokens / best_cpu,
            "chars_per_token": chars / tokens, "tokens": tokens, "documents": len(docs)}


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
    if "segment_ids" in batch:
        return int(np.count_nonzero(batch["segment_ids"]))
    return int(np.count_nonzero(batch["encoder_segment_ids"]) +
               np.count_nonzero(batch["decoder_segment_ids"]))


def pipeline_speed(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, objective: str,
                   workers: int, num_batches: int, repeats: int = 1) -> dict[str, float]:
    """Tokens/s over `num_batches` training batches after the first (which starts the workers
    and fills the first shuffle window: reported as first_batch_s), per wall-clock second and,
    in-process (workers=0), per CPU second of this process; the best of `repeats` runs."""
    cfg = dict(data_cfg) | {"worker_count": workers}
    best: dict[str, float] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        batches = iter(pipeline.local_batches(cfg, tokenizer, cfg["train_split"],
                                              objective=objective, local_batch=cfg["batch_size"],
                                              shuffle=True, num_epochs=None))
        next(batches)
        first = time.perf_counter() - start
        wall, cpu, tokens = time.perf_counter(), time.process_time(), 0
        for _ in range(num_batches):
            tokens += real_tokens(next(batches))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        del batches
        run = {"workers": workers, "tokens_per_s": tokens / wall,
               "tokens_per_cpu_s": tokens / cpu if workers == 0 else None,
               "first_batch_s": first, "rows_per_s": num_batches * cfg["batch_size"] / wall}
        key = "tokens_per_cpu_s" if workers == 0 else "tokens_per_s"
        if not best or run[key] > best[key]:
            best = run
    return best


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m data.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default=None,
                        help=f"one of {sorted(pipeline.ROWS)}; default train.objective")
    parser.add_argument("--workers", default=f"0,1,{os.cpu_count() or 1}",
                        help="comma-separated grain worker counts (0 = in-process)")
    parser.add_argument("--batches", type=int, default=0,
                        help="batches timed per worker count; 0 = four shuffle windows' worth")
    parser.add_argument("--repeats", type=int, default=3,
                        help="in-process runs (and raw encodes); the best counts, since other "
                             "processes share the CPUs")
    parser.add_argument("--sample-chars", type=int, default=20_000_000,
                        help="characters encoded for the raw sentencepiece figure")
    parser.add_argument("--workdir", default="runs/data_benchmark",
                        help="where the tokenizer is trained (once) if data.tokenizer.path is ''")
    with fail_cleanly("--verbose" in argv):
        args, config = parse(parser, argv)
        objective = args.objective or config.train.objective
        if objective not in pipeline.ROWS:
            parser.error(f"--objective {objective!r}: choose one of {sorted(pipeline.ROWS)}")
        data_config.check(config.data, objective)
        tokenizer = pipeline.load_or_train_tokenizer(config.data, args.workdir)
        num_batches = args.batches or max(
            20, -(-4 * config.data.shuffle_window // config.data.batch_size))
        raw = raw_encode_speed(config.data, tokenizer, args.sample_chars, args.repeats)
        print(f"raw sentencepiece encode, 1 thread: {raw['tokens_per_s']:,.0f} tokens/s "
              f"({raw['tokens_per_cpu_s']:,.0f} per CPU second; {raw['chars_per_token']:.2f} "
              f"chars/token, vocab {tokenizer.vocab_size}); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            result = pipeline_speed(config.data, tokenizer, objective, workers, num_batches,
                                    repeats=args.repeats if workers == 0 else 1)
            result["per_worker_vs_raw"] = (result["tokens_per_s"] / max(workers, 1)
                                           / raw["tokens_per_s"])
            line = (f"{objective} pipeline, {workers} worker(s): {result['tokens_per_s']:,.0f} "
                    f"tokens/s = {result['per_worker_vs_raw']:.2f} of raw per worker")
            if workers == 0:
                result["cpu_vs_raw"] = result["tokens_per_cpu_s"] / raw["tokens_per_cpu_s"]
                line += (f"; {result['tokens_per_cpu_s']:,.0f} per CPU second = "
                         f"{result['cpu_vs_raw']:.2f} of raw")
            print(f"{line} (first batch {result['first_batch_s']:.1f} s)", flush=True)
            rows.append(result)
    print(json.dumps({"objective": objective, "seq_len": config.data.seq_len,
                      "batch_size": config.data.batch_size, "batches": num_batches,
                      "cpus": os.cpu_count(),
                      "raw": raw, "pipeline": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
