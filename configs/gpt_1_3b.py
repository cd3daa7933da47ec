"""GPT-style ~1.3B-parameter decoder (the `1.3b` shape of ../shared/bench/reference_gpt.py).

Sharded with FSDP by default (params and optimizer state split over every device); on one GPU
that is the same as data parallelism. Add --config.model.remat=dots when memory is short.
"""
from configs.gpt_125m import get_config as base


def get_config():
    c = base()
    c.model.update(d_model=2048, n_heads=16, n_layers=24, d_ff=5632)
    c.data.update(batch_size=8)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.opt.update(lr=2e-4)
    return c
