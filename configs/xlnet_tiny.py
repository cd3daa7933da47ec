"""XLNet for a laptop CPU: a 4-layer two-stream permutation LM (model/xlnet.py) on the Python
standard library corpus. One random factorisation order per example, the last 1/6 of it
predicted (data.plm.predict_ratio), RoPE positions, packed rows; no memory (recurrence)."""
from configs.base import get_config as base


def get_config():
    c = base()
    # float32 and unrolled layers are the faster choice on a CPU (bf16 matmuls are emulated there)
    c.model.update(family="xlnet", d_model=256, n_heads=4, n_layers=4, d_ff=1024, mlp="gelu",
                   norm="layernorm", norm_eps=1e-12, pos="rope", max_len=128, use_bias=True,
                   dropout=0.1, dtype="float32", scan_layers=False)
    c.data.update(seq_len=128, batch_size=16)
    c.data.plm.update(predict_ratio=1 / 6)
    c.data.tokenizer.update(vocab_size=4096, sample_chars=3_000_000)
    c.opt.update(lr=1e-3, warmup_steps=50, b2=0.98, weight_decay=0.01)
    c.train.update(objective="plm", steps=600, log_every=25)
    c.eval.update(every=200, steps=20, sample_prompt="")
    c.ckpt.update(every=200, keep=2, keep_best=1)
    return c
