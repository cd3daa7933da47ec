"""Sequence classification on a task derived from the Python standard library (data/derived.py:
which top-level package a docstring comes from), CPU-sized (a few minutes on 2 cores). The model
is quickstart's, so `--config.finetune.init_from=runs/quickstart` fine-tunes that run; empty
init_from trains the same model from scratch (the baseline). Your own data:
--config.data.source=task_files --config.data.paths=train.jsonl --config.data.eval_paths=dev.jsonl
"""
from configs.base import get_config as base


def get_config():
    c = base()
    c.model.update(d_model=256, n_heads=4, n_layers=4, d_ff=704, max_len=256, dtype="float32",
                   scan_layers=False, dropout=0.1)
    c.train.update(objective="classify", steps=200, log_every=25)
    c.data.update(source="stdlib_task", seq_len=64, batch_size=16, validation_percent=15.0,
                  shuffle_window=256)
    c.data.task.update(derived="docstring_package")
    c.data.tokenizer.update(vocab_size=4096, sample_chars=1_000_000)
    c.opt.update(lr=5e-4, warmup_steps=20, weight_decay=0.01)
    c.eval.update(every=50, steps=10, sample_prompt="")
    c.ckpt.update(every=50, keep=2, keep_best=1)
    return c
