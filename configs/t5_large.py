"""T5 v1.1 large (google/t5-v1_1-large, ~783M parameters): the base preset, wider and deeper."""
from configs.t5_base import get_config as base


def get_config():
    c = base()
    c.model.update(d_model=1024, n_heads=16, n_layers=24, n_decoder_layers=24, d_ff=2816)
    c.opt.update(lr=5e-4)
    return c
