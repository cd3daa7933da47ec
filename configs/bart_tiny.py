"""A BART-style denoising encoder-decoder for a laptop CPU (Lewis et al. 2020): text infilling
(Poisson(3) spans, one [MASK] each, 30% of the tokens) and sentence permutation on the Python
standard library; the decoder rebuilds the original text. BART's own blocks: post-LN layernorm,
GELU, learned positions, biases (model.post_norm needs the warmup it has here). Other noises:
--config.data.noise.mask_rate / delete_rate / rotate_rate."""
from configs.t5_tiny import get_config as t5_tiny


def get_config():
    c = t5_tiny()
    c.model.update(mlp="gelu", d_ff=1024, norm="layernorm", norm_eps=1e-5, pos="learned",
                   use_bias=True, post_norm=True)
    c.data.noise.update(infill_rate=0.3, infill_lambda=3.0, permute_rate=1.0)
    c.opt.update(lr=1e-3, warmup_steps=100)
    c.train.update(objective="denoise")
    return c
