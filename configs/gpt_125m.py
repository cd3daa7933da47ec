"""GPT-style ~125M-parameter decoder (the `125m` shape of ../shared/bench/reference_gpt.py).

For a real run point it at a prepared tfds corpus, e.g.
  --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 --config.data.data_dir=gs://...
data.batch_size is global: 16 x 2048 tokens fits one 80 GB GPU; raise it with more devices or
opt.grad_accum (the usual ~0.5M tokens per step is batch_size=256).
"""
from configs.base import get_config as base


def get_config():
    c = base()
    c.model.update(vocab_size=32000, d_model=768, n_heads=12, n_layers=12, d_ff=2048,
                   max_len=2048, dtype="bfloat16")
    c.data.update(seq_len=2048, batch_size=16)
    c.data.tokenizer.update(vocab_size=32000)
    c.opt.update(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1)
    c.train.update(steps=100_000, log_every=100)
    c.eval.update(every=2000, steps=50)
    c.ckpt.update(every=2000)
    return c
