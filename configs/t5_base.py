"""T5 v1.1 base (google/t5-v1_1-base, ~248M parameters): T5 as published, span corruption.

Relative position bias (32 buckets up to distance 128, one table per stack), RMS norms without
biases, gated-GELU MLP, unscaled attention logits, an untied output layer, no dropout in
pre-training; encoder inputs of 512 tokens and 128 sequences a step, as in the paper. Loom
trains it with AdamW (T5 used Adafactor). For a real run point it at a prepared tfds corpus,
e.g. --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 --config.data.data_dir=...
The vocabulary is 32000 sentencepiece pieces (the 100 sentinels among them) in a 32128-row
embedding, T5's size.
"""
from configs.base import get_config as base


def get_config():
    c = base()
    c.model.update(family="encoder_decoder", vocab_size=32128, d_model=768, n_heads=12,
                   head_dim=64, n_layers=12, n_decoder_layers=12, d_ff=2048, mlp="geglu",
                   norm="rmsnorm", norm_eps=1e-6, pos="relative_bias", rel_buckets=32,
                   rel_max_distance=128, qk_scale=False, tie_embeddings=False,
                   scale_decoder_output=False, use_bias=False, dropout=0.0, max_len=512,
                   dtype="bfloat16", init_std=0.02)
    c.data.update(seq_len=512, batch_size=128)
    c.data.tokenizer.update(vocab_size=32000)
    c.opt.update(lr=1e-3, warmup_steps=10_000, weight_decay=0.0)
    c.train.update(objective="span_corruption", steps=524_288, log_every=100)
    c.eval.update(every=5000, steps=50, sample_prompt="")
    c.ckpt.update(every=5000)
    return c
