"""Encoder-decoder LM (T5 style): a bidirectional encoder and a causal decoder that cross-attends
to the encoder output, sharing one token embedding (and the position table, when learned).

`model.n_layers` counts the encoder's blocks, `model.n_decoder_layers` the decoder's (0 = as
many). For generation, `encode` runs once and `decoder_logits` runs the decoder alone; in
decode mode the decoder's self-attention keys/values and the projected encoder output are kept
in the "cache" collection (`init_cache`), so each step costs one token of decoder work.

T5 as published is this model with `model.pos="relative_bias"` (model/relative.py: one bias
table per stack), RMS norms, no biases, `qk_scale=False`, a geglu (v1.1) or relu (1.0) MLP and an
untied output (v1.1) or a tied one after `scale_decoder_output` (1.0); train/hf/t5.py maps it
to Hugging Face's T5ForConditionalGeneration.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention
from model.config import ModelConfig
from model.encoder import EncoderStack, default_positions
from model.layers import (Mlp, PositionEmbedding, constrain, dense, norm, prepend_prompt,
                          prompted_segments, residual, stack, token_embedding)
from model.relative import RelativeBias


class CrossDecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, MLP; pre-norm, or post-LN
    (the original Transformer's decoder) with `model.post_norm`."""
    cfg: ModelConfig
    out_std: float
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, positions_BxS: jax.Array,
                 segment_ids_BxS: jax.Array | None, encoded_BxTxD: jax.Array | None,
                 encoder_segment_ids_BxT: jax.Array | None,
                 bias_BxNxSxS: jax.Array | None = None) -> tuple[jax.Array, None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attn = Attention(cfg, self.out_std, causal=True, decode=self.decode, name="attn")
        cross = Attention(cfg, self.out_std, cross=True, decode=self.decode, name="cross_attn")
        x_BxSxD = residual(cfg, x_BxSxD, lambda h: attn(h, positions_BxS, segment_ids_BxS,
                                                    bias_BxNxTxS=bias_BxNxSxS),
                           norm(cfg, "attn_norm"), drop)
        x_BxSxD = residual(cfg, x_BxSxD, lambda h: cross(
            h, positions_BxS, segment_ids_BxS, encoded_BxTxD, encoder_segment_ids_BxT),
            norm(cfg, "cross_norm"), drop)
        x_BxSxD = residual(cfg, x_BxSxD, Mlp(cfg, self.out_std, name="mlp"),
                           norm(cfg, "mlp_norm"), drop)
        return constrain(x_BxSxD, ("batch", "seq", "act_embed")), None


class DecoderStack(nn.Module):
    """`decoder_layers` cross-attending blocks ("layers") and, when pre-norm, the final norm."""
    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, positions_BxS: jax.Array,
                 segment_ids_BxS: jax.Array | None, encoded_BxTxD: jax.Array | None,
                 encoder_segment_ids_BxT: jax.Array | None, *, train: bool = False) -> jax.Array:
        cfg = self.cfg
        n = cfg.decoder_layers
        # T5: one causal relative position bias for the self-attention of every layer (in decode
        # mode against every cached key); cross-attention has none
        bias = (RelativeBias(cfg, bidirectional=False, decode=self.decode, name="pos")(
            positions_BxS),) if cfg.pos == "relative_bias" else ()
        # GPT-2 style: output projections into the residual stream shrink with depth
        x_BxSxD = stack(cfg, CrossDecoderBlock, n, x_BxSxD, positions_BxS, segment_ids_BxS,
                        encoded_BxTxD, encoder_segment_ids_BxT, *bias,
                        out_std=cfg.init_std / math.sqrt(3 * n), decode=self.decode,
                        deterministic=not train)
        if not cfg.post_norm:     # post-LN blocks end normed already
            x_BxSxD = norm(cfg, "final_norm")(x_BxSxD)
        return constrain(x_BxSxD, ("batch", "seq", "act_embed"))


class EncoderDecoderLM(nn.Module):
    """(encoder tokens_BxT, decoder tokens_BxS) -> decoder logits_BxSxV (float32).

    Segment ids (1, 2, ... per packed example, 0 for padding) keep self-attention inside an
    example on each side, and let decoder segment i cross-attend only to encoder segment i;
    positions restart at 0 in each example. All default to one unpacked example per row.
    """
    cfg: ModelConfig
    decode: bool = False

    def setup(self):
        cfg = self.cfg
        self.embed = token_embedding(cfg)
        self.pos = PositionEmbedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = EncoderStack(cfg)
        self.decoder = DecoderStack(cfg, decode=self.decode)
        if not cfg.tie_embeddings:
            self.lm_head = dense(cfg, cfg.vocab_size, ("embed", "vocab"))

    def _embed(self, tokens_BxT, positions_BxT, train):
        x_BxTxD = self.drop(self.pos(self.embed(tokens_BxT), positions_BxT),
                            deterministic=not train)
        return constrain(x_BxTxD, ("batch", "seq", "act_embed"))

    def encode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, *, train: bool = False,
               prompt_PxD: jax.Array | None = None, keep_prompt: bool = False) -> jax.Array:
        """The encoder output encoded_BxTxD (final-normed), which the decoder attends to;
        `prompt_PxD`: a soft prompt read before the tokens, whose P outputs are dropped (task
        features) or, with `keep_prompt`, kept in front (for the decoder to attend to: their
        segment ids are `model.layers.prompted_segments`)."""
        if positions_BxT is None:
            positions_BxT = default_positions(tokens_BxT)
        x_BxTxD = self._embed(tokens_BxT, positions_BxT, train)
        if prompt_PxD is None:
            return self.encoder(x_BxTxD, positions_BxT, segment_ids_BxT, train=train)
        h_BxTxD = self.encoder(*prepend_prompt(prompt_PxD, x_BxTxD, positions_BxT,
                                               segment_ids_BxT), train=train)
        return h_BxTxD if keep_prompt else h_BxTxD[:, prompt_PxD.shape[0]:]

    def decoder_logits(self, tokens_BxS: jax.Array, encoded_BxTxD: jax.Array | None,
                       encoder_segment_ids_BxT: jax.Array | None = None,
                       positions_BxS: jax.Array | None = None,
                       segment_ids_BxS: jax.Array | None = None, *, train: bool = False
                       ) -> jax.Array:
        """Decoder logits given the encoder output. In decode mode, pass `encoded_BxTxD` (and its
        segment ids) on the first call, which caches its keys/values, and None afterwards."""
        if positions_BxS is None:
            positions_BxS = default_positions(tokens_BxS)
        h_BxSxD = self.decoder(self._embed(tokens_BxS, positions_BxS, train), positions_BxS,
                               segment_ids_BxS, encoded_BxTxD, encoder_segment_ids_BxT,
                               train=train)
        if self.cfg.scale_decoder_output:   # T5 1.0 (with its tied embeddings)
            h_BxSxD = h_BxSxD * jnp.asarray(self.cfg.d_model ** -0.5, h_BxSxD.dtype)
        if self.cfg.tie_embeddings:
            logits_BxSxV = self.embed.attend(h_BxSxD)
        else:
            logits_BxSxV = self.lm_head(h_BxSxD)
        return constrain(logits_BxSxV.astype(jnp.float32), ("batch", "seq", "act_vocab"))

    def __call__(self, encoder_tokens_BxT: jax.Array, decoder_tokens_BxS: jax.Array,
                 encoder_positions_BxT: jax.Array | None = None,
                 encoder_segment_ids_BxT: jax.Array | None = None,
                 decoder_positions_BxS: jax.Array | None = None,
                 decoder_segment_ids_BxS: jax.Array | None = None, *, train: bool = False,
                 prompt_PxD: jax.Array | None = None) -> jax.Array:
        """`prompt_PxD`: a soft prompt read before the encoder tokens (prompt tuning), which
        the decoder attends to with them."""
        encoded_BxTxD = self.encode(encoder_tokens_BxT, encoder_positions_BxT,
                                    encoder_segment_ids_BxT, train=train, prompt_PxD=prompt_PxD,
                                    keep_prompt=True)
        if prompt_PxD is not None:
            encoder_segment_ids_BxT = prompted_segments(
                prompt_PxD.shape[0], encoder_segment_ids_BxT, encoder_tokens_BxT.shape)
        return self.decoder_logits(decoder_tokens_BxS, encoded_BxTxD, encoder_segment_ids_BxT,
                                   decoder_positions_BxS, decoder_segment_ids_BxS, train=train)


def init_cache(cfg: ModelConfig, batch: int, length: int, encoder_length: int) -> dict:
    """Zeroed decoding cache: `length` self-attention slots per row and room for an encoder
    output of `encoder_length` tokens. Use with `build(cfg, decode=True)`."""
    model = EncoderDecoderLM(cfg, decode=True)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32),
        jnp.zeros((batch, encoder_length, cfg.d_model), cfg.compute_dtype),
        method=model.decoder_logits))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
