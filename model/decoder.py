"""Decoder-only causal language model (GPT / Llama style): pre-norm blocks with a final norm, or
with `model.post_norm` the original Transformer's post-LN blocks and no final norm."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention
from model.config import ModelConfig
from model.layers import (Mlp, PositionEmbedding, constrain, dense, norm, prepend_prompt,
                          residual, rotary, stack, tied_logits, token_embedding)


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2 style: output projections into the residual stream shrink with depth."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


class DecoderBlock(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array | None) -> tuple[jax.Array, None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attn = Attention(cfg, residual_std(cfg), causal=True, decode=self.decode, name="attn")
        x_BxTxD = residual(cfg, x_BxTxD, lambda h: attn(h, positions_BxT, segment_ids_BxT),
                           norm(cfg, "attn_norm"), drop)
        x_BxTxD = residual(cfg, x_BxTxD, Mlp(cfg, residual_std(cfg), name="mlp"),
                           norm(cfg, "mlp_norm"), drop)
        return constrain(x_BxTxD, ("batch", "seq", "act_embed")), None


class DecoderLM(nn.Module):
    """tokens_BxT -> logits_BxTxV (float32).

    `segment_ids_BxT` (1, 2, ... per packed document, 0 for padding) keep attention inside a
    document; `positions_BxT` restart at 0 in each document. Both default to one unpacked row.
    With `decode=True` the attention layers read and extend a KV cache (see model.attention).
    """
    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None, *, train: bool = False,
                 hidden: bool = False, prompt_PxD: jax.Array | None = None) -> jax.Array:
        """Logits, or with `hidden=True` the final-normed hidden states h_BxTxD (task heads);
        `prompt_PxD` is a soft prompt read before the tokens (model.layers.prepend_prompt)."""
        cfg = self.cfg
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        embed = token_embedding(cfg)
        x_BxTxD = PositionEmbedding(cfg, name="pos")(embed(tokens_BxT), positions_BxT)
        x_BxTxD = nn.Dropout(cfg.dropout, deterministic=not train)(x_BxTxD)
        x_BxTxD = constrain(x_BxTxD, ("batch", "seq", "act_embed"))
        if prompt_PxD is not None:
            x_BxTxD, positions_BxT, segment_ids_BxT = prepend_prompt(
                prompt_PxD, x_BxTxD, positions_BxT, segment_ids_BxT)
        if cfg.pos == "rope":   # its tables once, not in every layer
            positions_BxT = rotary(positions_BxT, cfg.head_size, cfg.rope_theta)
        x_BxTxD = stack(cfg, DecoderBlock, cfg.n_layers, x_BxTxD, positions_BxT, segment_ids_BxT,
                        decode=self.decode, deterministic=not train)
        if not cfg.post_norm:     # post-LN blocks end normed already
            x_BxTxD = norm(cfg, "final_norm")(x_BxTxD)
        if prompt_PxD is not None:
            x_BxTxD = x_BxTxD[:, prompt_PxD.shape[0]:]
        if hidden:
            return x_BxTxD
        if cfg.tie_embeddings:
            logits_BxTxV = tied_logits(embed, x_BxTxD)
        else:
            logits_BxTxV = dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="lm_head")(x_BxTxD)
        return constrain(logits_BxTxV.astype(jnp.float32), ("batch", "seq", "act_vocab"))
