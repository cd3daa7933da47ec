"""Token classification (BIO tagging) on a task derived from the Python standard library
(data/derived.py: `tokenize` token types over real source lines; dotted attribute chains are
multi-token ATTR entities), CPU-sized. The model is quickstart's, so
`--config.finetune.init_from=runs/quickstart` fine-tunes that run; empty init_from = from
scratch. Your own CoNLL or JSONL data: --config.data.source=task_files --config.data.paths=...
"""
from configs.finetune_classify import get_config as classify


def get_config():
    c = classify()
    c.train.update(objective="tag")
    c.data.update(validation_percent=2.0)
    c.data.task.update(derived="token_types")
    c.finetune.update(eval_examples=300)
    return c
