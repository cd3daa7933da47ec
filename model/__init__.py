"""Loom's Flax modules. `build(cfg)` returns the module for a `ModelConfig`."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig, ModelConfigError
from model.decoder import DecoderLM
from model.electra import ElectraLM
from model.encoder import EncoderLM
from model.encoder_decoder import EncoderDecoderLM

__all__ = ["ModelConfig", "ModelConfigError", "build", "flops_per_token", "init_inputs"]


def build(cfg: ModelConfig, *, decode: bool = False) -> nn.Module:
    """The Flax module of `cfg.family`; `decode=True` (KV cache) for the families that decode."""
    if cfg.family == "decoder":
        return DecoderLM(cfg, decode=decode)
    if cfg.family == "encoder_decoder":
        return EncoderDecoderLM(cfg, decode=decode)
    if decode:
        raise ValueError(f"model.family={cfg.family!r} does not decode autoregressively")
    if cfg.family == "encoder":
        return EncoderLM(cfg)
    if cfg.family == "electra":
        return ElectraLM(cfg)
    raise ValueError(f"unknown model family {cfg.family!r}")


def init_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8) -> tuple:
    """Positional inputs that `build(cfg).init` needs to create every parameter."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    if cfg.family == "encoder_decoder":
        return tokens, tokens     # encoder tokens, decoder tokens
    return (tokens,)


def _attention(layers: int, cfg: ModelConfig, context: int) -> float:
    """PaLM's attention FLOPs per query token, forward + backward: 12 * L * heads * K * context."""
    return 12.0 * layers * cfg.n_heads * cfg.head_size * context


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int,
                    decoder_len: int | None = None) -> float:
    """Training FLOPs per input token: 6N for the matmuls forward+backward plus attention (PaLM
    appendix B; N counts every parameter, embeddings included, as the reference does).

    electra adds the generator's attention (its parameters are in N). encoder_decoder counts per
    encoder token (data.seq_len, the unit of tokens/s) with `decoder_len` decoder tokens per row
    (default seq_len): encoder parameters work on seq_len tokens, decoder parameters and the
    output projection on decoder_len, token lookups are free; plus self- and cross-attention.
    """
    if cfg.family == "electra":
        generator = cfg.generator_config()
        return 6.0 * n_params + _attention(cfg.n_layers, cfg, seq_len) + \
            _attention(generator.n_layers, generator, seq_len)
    if cfg.family != "encoder_decoder":
        return 6.0 * n_params + _attention(cfg.n_layers, cfg, seq_len)
    t, s = seq_len, decoder_len or seq_len
    shapes = jax.eval_shape(lambda: build(cfg).init(jax.random.PRNGKey(0), *init_inputs(cfg)))
    n_decoder = sum(x.size for x in jax.tree.leaves(shapes["params"]["decoder"]))
    n_lookup = cfg.vocab_size * cfg.d_model                  # the token embedding table
    n_output = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model   # untied lm_head
    n_encoder = n_params - n_decoder - n_lookup - n_output
    matmuls = 6.0 * (n_encoder * t + (n_decoder + cfg.vocab_size * cfg.d_model) * s)
    attention = _attention(cfg.n_layers, cfg, t) * t + \
        _attention(cfg.decoder_layers, cfg, s + t) * s      # decoder: self + cross
    return (matmuls + attention) / t
