"""BERT-base (Devlin et al. 2018): 12 post-LN blocks of 768, 12 heads, MLP 3072, 30522-piece
vocabulary, 512 positions, two token types, MLM + NSP; 110M parameters as published (Loom counts
109.5M without the MLM head, as BertModel with its pooler, and 110.1M with it, as
BertForPreTraining; tests/test_presets.py).

The original schedule: 1M steps of 256 x 512 tokens (90% of them at length 128), Adam at 1e-4,
10k warmup, weight decay 0.01. Loom's GELU is the tanh approximation ("gelu_new"), so the
model exports to Hugging Face BERT (`--config.model.mlp=gelu_exact` for BERT's erf GELU).
Point it at a prepared corpus, e.g. --config.data.source=tfds --config.data.tfds_name=wikipedia.
"""
from configs.base import get_config as base


def get_config():
    c = base()
    c.model.update(family="encoder", vocab_size=30522, d_model=768, n_heads=12, n_layers=12,
                   d_ff=3072, mlp="gelu", norm="layernorm", norm_eps=1e-12, pos="learned",
                   max_len=512, use_bias=True, dropout=0.1, type_vocab_size=2, post_norm=True,
                   dtype="bfloat16")
    c.data.update(seq_len=512, batch_size=256)
    c.data.mlm.update(sentence_pairs="nsp")
    c.data.tokenizer.update(vocab_size=30522)
    c.opt.update(lr=1e-4, warmup_steps=10_000, schedule="linear", min_lr_ratio=0.0, b2=0.999,
                 eps=1e-6, weight_decay=0.01)
    c.train.update(objective="mlm", steps=1_000_000, log_every=100)
    c.eval.update(every=10_000, steps=50, sample_prompt="")
    c.ckpt.update(every=10_000)
    return c
