"""The `tiny` shape of ../shared/bench/reference_gpt.py (vocab 8192, d 256, 4 heads, 4 layers,
ff 704, seq 256, batch 8), for side-by-side CPU benchmarks: python -m train.benchmark --config
configs/bench_tiny.py. Same block as the reference: RMSNorm, RoPE, SwiGLU, tied embeddings."""
from configs.base import get_config as base


def get_config():
    c = base()
    # On a CPU, float32 and unrolled layers are Loom's faster settings (XLA:CPU emulates bf16
    # matmuls, and 4 unrolled layers skip the scan's per-layer slicing); override for accelerators.
    c.model.update(vocab_size=8192, d_model=256, n_heads=4, n_layers=4, d_ff=704, max_len=256,
                   dtype="float32", scan_layers=False)
    c.data.update(seq_len=256, batch_size=8)
    c.opt.update(lr=3e-4, weight_decay=0.1, clip_norm=0.0, warmup_steps=0, schedule="constant")
    return c
