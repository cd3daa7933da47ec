"""About five minutes on a 2-core CPU: a 4-layer decoder trained on the Python standard library
(pydoc topics and module sources), evaluated on held-out modules, then a text sample."""
from configs.base import get_config as base


def get_config():
    c = base()
    # float32 and unrolled layers are the faster choice on a CPU (bf16 matmuls are emulated there)
    c.model.update(d_model=256, n_heads=4, n_layers=4, d_ff=704, max_len=256, dtype="float32",
                   scan_layers=False)
    c.data.update(seq_len=128, batch_size=16)
    c.data.tokenizer.update(vocab_size=4096, sample_chars=3_000_000)
    c.opt.update(lr=2e-3, warmup_steps=50, weight_decay=0.1)
    c.train.update(steps=300, log_every=25)
    c.eval.update(every=100, steps=20, sample_prompt="def ", sample_tokens=96)
    c.ckpt.update(every=100, keep=2, keep_best=1)
    return c
