"""A T5-style encoder-decoder for a laptop CPU: span corruption on the Python standard library
(--config.train.objective=prefix_lm for prefix LM). Pre-norm RMSNorm blocks, gated MLP, RoPE
self-attention, shared input/output embedding. T5 as published (relative position bias, gated
GELU, unscaled logits, untied output; what configs/t5_base.py sets) at this size:
--config.model.pos=relative_bias --config.model.mlp=geglu --config.model.qk_scale=false
--config.model.tie_embeddings=false"""
from configs.base import get_config as base


def get_config():
    c = base()
    c.model.update(family="encoder_decoder", d_model=256, n_heads=4, n_layers=3,
                   n_decoder_layers=3, d_ff=704, mlp="swiglu", norm="rmsnorm", pos="rope",
                   max_len=256, dtype="float32", scan_layers=False)
    c.data.update(seq_len=128, batch_size=16)
    c.data.tokenizer.update(vocab_size=4096, sample_chars=3_000_000)
    c.opt.update(lr=2e-3, warmup_steps=50, weight_decay=0.1)
    c.train.update(objective="span_corruption", steps=600, log_every=25)
    c.eval.update(every=200, steps=20, sample_prompt="")
    c.ckpt.update(every=200, keep=2, keep_best=1)
    return c
