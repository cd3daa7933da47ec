"""Conditional generation on a task derived from the Python standard library (data/derived.py:
a docstring's first line -> the function's signature), CPU-sized. A decoder reads the input as
a prompt (loss on the target only); a T5 backbone encodes the input and decodes the target.
The model is quickstart's, so `--config.finetune.init_from=runs/quickstart` fine-tunes that
run; empty init_from = from scratch. Scored by greedy generation: exact match, BLEU, chrF,
ROUGE-L.
"""
from configs.finetune_classify import get_config as classify


def get_config():
    c = classify()
    c.train.update(objective="text2text")
    c.data.task.update(derived="signature")
    c.finetune.update(eval_examples=64, max_new_tokens=24)
    return c
