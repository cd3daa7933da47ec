"""Loom's Flax modules. `build(cfg)` returns the module for a `ModelConfig`."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from model.config import ModelConfig, ModelConfigError
from model.decoder import DecoderLM

__all__ = ["ModelConfig", "ModelConfigError", "build", "flops_per_token", "init_inputs"]


def build(cfg: ModelConfig, *, decode: bool = False) -> nn.Module:
    """The Flax module of `cfg.family`."""
    if cfg.family == "decoder":
        return DecoderLM(cfg, decode=decode)
    raise ValueError(f"unknown model family {cfg.family!r}")


def init_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8) -> tuple:
    """Positional inputs that `build(cfg).init` needs to create every parameter."""
    del cfg
    return (jnp.zeros((batch, length), jnp.int32),)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls forward+backward plus 12*L*d*T attention
    (PaLM appendix B; N counts every parameter, embeddings included, as the reference does)."""
    return 6.0 * n_params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
