"""XLNet-base shapes for accelerators (Yang et al., 2019: the BERT-base size, 12 layers,
d_model 768, 12 heads, d_ff 3072, 32000-piece SentencePiece vocabulary; published as 110M
parameters). Loom's XLNet uses RoPE instead of Transformer-XL relative positions (no relative
position projection or biases) and has no segment recurrence, so it counts 109.6M. Point
data.tokenizer.path at a 32000-piece vocabulary (or let one be trained) and data at a corpus."""
from configs.xlnet_tiny import get_config as xlnet_tiny


def get_config():
    c = xlnet_tiny()
    c.model.update(vocab_size=32000, d_model=768, n_heads=12, n_layers=12, d_ff=3072,
                   max_len=512, dropout=0.1, dtype="bfloat16", scan_layers=True)
    c.data.update(seq_len=512, batch_size=256)
    c.data.tokenizer.update(vocab_size=32000)
    c.opt.update(lr=4e-4, warmup_steps=10_000, b2=0.999, eps=1e-6, weight_decay=0.01,
                 schedule="linear", min_lr_ratio=0.0)
    c.train.update(steps=500_000, log_every=100)
    c.eval.update(every=10_000, steps=50)
    c.ckpt.update(every=10_000, keep=3, keep_best=1)
    return c
