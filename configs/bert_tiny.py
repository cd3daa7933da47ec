"""A BERT-style encoder for a laptop CPU: masked-LM (+ NSP/SOP when the data gives sentence
pairs) on the Python standard library corpus. Pre-norm blocks; --config.model.post_norm=true
gives BERT's original post-LN layout, which maps exactly onto Hugging Face BERT."""
from configs.base import get_config as base


def get_config():
    c = base()
    # float32 and unrolled layers are the faster choice on a CPU (bf16 matmuls are emulated there)
    c.model.update(family="encoder", d_model=256, n_heads=4, n_layers=4, d_ff=1024, mlp="gelu",
                   norm="layernorm", norm_eps=1e-12, pos="learned", max_len=128, use_bias=True,
                   dropout=0.1, type_vocab_size=2, dtype="float32", scan_layers=False)
    c.data.update(seq_len=128, batch_size=16)
    c.data.tokenizer.update(vocab_size=4096, sample_chars=3_000_000)
    c.opt.update(lr=1e-3, warmup_steps=50, b2=0.98, weight_decay=0.01)
    c.train.update(objective="mlm", steps=600, log_every=25)
    c.eval.update(every=200, steps=20, sample_prompt="")
    c.ckpt.update(every=200, keep=2, keep_best=1)
    return c
