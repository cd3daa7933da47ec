"""Bidirectional encoder LM (BERT style): embeddings, encoder blocks, MLM and sentence-pair heads.

Blocks are pre-norm with a final norm, like the decoder's; `model.post_norm` switches to BERT's
original post-LN blocks (no final norm), which is BERT itself given layernorm, gelu, learned
positions and biases. The embeddings are normalised in both cases (BERT, RoBERTa-PreLN and
ELECTRA all do), so either layout maps one-to-one onto a Hugging Face checkpoint.

The pieces (`Embeddings`, `EncoderStack`, the heads) are shared with model/electra.py and
model/encoder_decoder.py.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention
from model.config import ModelConfig
from model.decoder import residual_std
from model.layers import (Mlp, PositionEmbedding, constrain, dense, gelu, norm, prepend_prompt,
                          stack, token_embedding)
from model.relative import RelativeBias


def default_positions(tokens_BxT: jax.Array) -> jax.Array:
    """0, 1, 2, ... in every row: the positions of one unpacked example per row."""
    return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)


class EncoderBlock(nn.Module):
    """Bidirectional self-attention + MLP; attention stays inside each segment (0 = padding)."""
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array | None, bias_BxNxTxS: jax.Array | None = None
                 ) -> tuple[jax.Array, None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attn = functools.partial(Attention(cfg, residual_std(cfg), causal=False, name="attn"),
                                 bias_BxNxTxS=bias_BxNxTxS)
        mlp = Mlp(cfg, residual_std(cfg), name="mlp")
        attn_norm, mlp_norm = norm(cfg, "attn_norm"), norm(cfg, "mlp_norm")
        if cfg.post_norm:    # BERT: x = norm(x + f(x))
            x_BxTxD = attn_norm(x_BxTxD + drop(attn(x_BxTxD, positions_BxT, segment_ids_BxT)))
            x_BxTxD = mlp_norm(x_BxTxD + drop(mlp(x_BxTxD)))
        else:                # pre-norm: x = x + f(norm(x))
            x_BxTxD = x_BxTxD + drop(attn(attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT))
            x_BxTxD = x_BxTxD + drop(mlp(mlp_norm(x_BxTxD)))
        return constrain(x_BxTxD, ("batch", "seq", "act_embed")), None


class EncoderStack(nn.Module):
    """`n_layers` encoder blocks ("layers") and, when pre-norm, the final norm."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array | None, *, train: bool = False) -> jax.Array:
        cfg = self.cfg
        # T5: one relative position bias for the whole stack (model/relative.py)
        bias = (RelativeBias(cfg, bidirectional=True, name="pos")(positions_BxT),) \
            if cfg.pos == "relative_bias" else ()
        x_BxTxD = stack(cfg, EncoderBlock, cfg.n_layers, x_BxTxD, positions_BxT, segment_ids_BxT,
                        *bias, deterministic=not train)
        if not cfg.post_norm:
            x_BxTxD = norm(cfg, "final_norm")(x_BxTxD)
        return constrain(x_BxTxD, ("batch", "seq", "act_embed"))


class Embeddings(nn.Module):
    """norm(token + position + token type), then dropout; `attend` is the tied output projection.
    With `model.embed_dim` (ALBERT) they are E wide and a dense layer ("proj") maps them up to
    d_model."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        width = cfg.embed_width
        self.embed = token_embedding(cfg, features=width)
        self.pos = PositionEmbedding(cfg, width)
        if cfg.type_vocab_size:
            self.type_embed = nn.Embed(
                cfg.type_vocab_size, width, dtype=cfg.compute_dtype,
                param_dtype=cfg.weights_dtype, embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std), ("type_vocab", "embed")))
        self.norm = norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.embed_dim:   # E x D: the input side is replicated like other small head sides
            self.proj = dense(cfg, cfg.d_model, ("embed_out", "embed"), name="proj")

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                 type_ids_BxT: jax.Array | None, *, train: bool = False) -> jax.Array:
        x_BxTxD = self.pos(self.embed(tokens_BxT), positions_BxT)
        if self.cfg.type_vocab_size:
            if type_ids_BxT is None:
                type_ids_BxT = jnp.zeros_like(tokens_BxT)
            x_BxTxD = x_BxTxD + self.type_embed(type_ids_BxT)
        x_BxTxD = self.drop(self.norm(x_BxTxD), deterministic=not train)
        if self.cfg.embed_dim:
            x_BxTxD = self.proj(x_BxTxD)   # x_BxTxE -> x_BxTxD
        return constrain(x_BxTxD, ("batch", "seq", "act_embed"))

    def attend(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.embed.attend(x_BxTxD)


class MlmHead(nn.Module):
    """BERT's masked-LM head: dense to the embedding width, gelu, norm, then the output
    projection (the token embedding when tied) plus a per-token output bias."""
    cfg: ModelConfig
    embed_width: int

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array, embeddings: Embeddings) -> jax.Array:
        cfg = self.cfg
        h_BxTxE = dense(cfg, self.embed_width, ("embed", "embed_out"), name="transform")(h_BxTxD)
        h_BxTxE = norm(cfg, "norm")(gelu(cfg, h_BxTxE))
        if cfg.tie_embeddings:
            logits_BxTxV = embeddings.attend(h_BxTxE)
        else:
            logits_BxTxV = dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="out")(h_BxTxE)
        bias_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                            (cfg.vocab_size,), cfg.weights_dtype)
        logits_BxTxV = logits_BxTxV.astype(jnp.float32) + bias_V.astype(jnp.float32)[None, None]
        return constrain(logits_BxTxV, ("batch", "seq", "act_vocab"))


class PairHead(nn.Module):
    """Sentence-pair (NSP/SOP) logits from the first ([CLS]) token: BERT's tanh pooler, then a
    2-way classifier; logit 1 is "true next / right order", matching `pair_labels`."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        pooled_BxD = jnp.tanh(dense(cfg, cfg.d_model, ("embed", "embed_out"), name="pooler")(
            h_BxTxD[:, 0]))
        return dense(cfg, 2, ("embed", None), name="out")(pooled_BxD).astype(jnp.float32)


class EncoderLM(nn.Module):
    """tokens_BxT -> {"hidden": h_BxTxD, "mlm_logits": BxTxV, "pair_logits": Bx2} (float32 logits).

    `segment_ids_BxT` (1, 2, ... per packed example, 0 for padding) keep attention inside an
    example; `positions_BxT` restart at 0 in each; `type_ids_BxT` mark sentence A (0) / B (1).
    All default to one unpacked single-sentence example per row. `encode` gives the hidden
    states alone (for fine-tuning heads).
    """
    cfg: ModelConfig

    def setup(self):
        self.embeddings = Embeddings(self.cfg)
        self.encoder = EncoderStack(self.cfg)
        self.mlm_head = MlmHead(self.cfg, self.cfg.embed_width)
        self.pair_head = PairHead(self.cfg)

    def encode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, type_ids_BxT: jax.Array | None = None,
               *, train: bool = False, prompt_PxD: jax.Array | None = None) -> jax.Array:
        if positions_BxT is None:
            positions_BxT = default_positions(tokens_BxT)
        x_BxTxD = self.embeddings(tokens_BxT, positions_BxT, type_ids_BxT, train=train)
        if prompt_PxD is None:
            return self.encoder(x_BxTxD, positions_BxT, segment_ids_BxT, train=train)
        h_BxTxD = self.encoder(*prepend_prompt(prompt_PxD, x_BxTxD, positions_BxT,
                                               segment_ids_BxT), train=train)
        return h_BxTxD[:, prompt_PxD.shape[0]:]

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None, type_ids_BxT: jax.Array | None = None,
                 *, train: bool = False) -> dict[str, jax.Array]:
        h_BxTxD = self.encode(tokens_BxT, positions_BxT, segment_ids_BxT, type_ids_BxT,
                              train=train)
        return {"hidden": h_BxTxD, "mlm_logits": self.mlm_head(h_BxTxD, self.embeddings),
                "pair_logits": self.pair_head(h_BxTxD)}
