"""GPT-style ~350M-parameter decoder (the `350m` shape of ../shared/bench/reference_gpt.py)."""
from configs.gpt_125m import get_config as base


def get_config():
    c = base()
    c.model.update(d_model=1024, n_heads=16, n_layers=24, d_ff=2816)
    c.opt.update(lr=3e-4)
    return c
