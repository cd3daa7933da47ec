"""XLNet: a permutation language model with two-stream self-attention (Yang et al., 2019).

Each block runs two streams with the same weights. The content stream h_t is an ordinary
transformer state of token t; the query stream g_t carries only position t (it starts from one
trained vector, `mask_emb`, and RoPE gives it t's position), so it can predict token t without
seeing it. Keys and values come from the content stream only. With z a factorisation order of
a segment and `order[t]` the rank of t in it:

  content stream h_t attends to the tokens j of t's segment with order[j] <= order[t]
  query stream   g_t attends to the tokens j of t's segment with order[j] <  order[t]

so the prediction of t is a function of the tokens before it in the order, as XLNet's
objective needs, and never of token t itself. The query stream runs only at the P predicted
positions (`predict_BxP`, partial prediction), so its work is P/T of the content stream's.

Left out: Transformer-XL segment recurrence (memory), XLNet's relative positional encodings
(RoPE instead), its segment (sentence A/B) encodings, and post-LN blocks (pre-norm here).
Shape legend as in model/layers.py, plus P: prediction slots per row.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import attention_impl, gather_length, xla_attention
from model.config import ModelConfig
from model.decoder import residual_std
from model.layers import Mlp, constrain, dense, norm, rope, stack, tied_logits, token_embedding


def permutation_masks(order_BxT: jax.Array | None, segment_ids_BxT: jax.Array,
                      predict_BxP: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The content stream's B x 1 x T x T and the query stream's B x 1 x P x T attention masks.

    Both keep a query inside its own segment (segment 0, padding, is seen by none). With no
    `order` (fine-tuning, `init`) the content stream is bidirectional and the query stream sees
    every token of its segment but its own."""
    kv_BxT = segment_ids_BxT
    q_segments_BxP = jnp.take_along_axis(segment_ids_BxT, predict_BxP, axis=1)
    content = (kv_BxT[:, :, None] == kv_BxT[:, None, :]) & (kv_BxT[:, None, :] != 0)
    query = (q_segments_BxP[:, :, None] == kv_BxT[:, None, :]) & (kv_BxT[:, None, :] != 0)
    if order_BxT is None:
        keys_T = jnp.arange(kv_BxT.shape[1])
        query &= predict_BxP[:, :, None] != keys_T[None, None, :]
    else:
        q_order_BxP = jnp.take_along_axis(order_BxT, predict_BxP, axis=1)
        content &= order_BxT[:, None, :] <= order_BxT[:, :, None]
        query &= order_BxT[:, None, :] < q_order_BxP[:, :, None]
    return content[:, None], query[:, None]


def _attend(cfg: ModelConfig, q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask) -> jax.Array:
    """Softmax attention under a boolean mask with the repo's kernel choice (model.attention)."""
    impl = attention_impl(cfg, decode=False)
    if impl == "xla":
        return xla_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask, is_causal=False)
    return jax.nn.dot_product_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask=mask,
                                        implementation=impl)


class TwoStreamAttention(nn.Module):
    """One set of query/key/value/out weights for both streams; keys and values from h."""
    cfg: ModelConfig
    out_std: float

    @nn.compact
    def __call__(self, h_BxTxD, g_BxPxD, positions_BxT, q_positions_BxP, content_mask,
                 query_mask) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        heads = ("embed", "heads", "head_dim")
        kv = ("embed", "kv_heads", "head_dim")
        query = dense(cfg, (cfg.n_heads, cfg.head_size), heads, name="query")
        k_BxTxGxK = dense(cfg, (cfg.kv_heads, cfg.head_size), kv, name="key")(h_BxTxD)
        v_BxTxGxK = dense(cfg, (cfg.kv_heads, cfg.head_size), kv, name="value")(h_BxTxD)
        out = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                    std=self.out_std, name="out")
        k_BxTxGxK = constrain(k_BxTxGxK, ("batch", "seq", "act_kv_heads", "head_dim"))
        v_BxTxGxK = constrain(v_BxTxGxK, ("batch", "seq", "act_kv_heads", "head_dim"))
        qh_BxTxNxK = constrain(query(h_BxTxD), ("batch", "seq", "act_heads", "head_dim"))
        qg_BxPxNxK = constrain(query(g_BxPxD), ("batch", None, "act_heads", "head_dim"))
        if cfg.pos == "rope":   # the query stream's queries sit at their targets' positions
            qh_BxTxNxK = rope(qh_BxTxNxK, positions_BxT, cfg.rope_theta)
            qg_BxPxNxK = rope(qg_BxPxNxK, q_positions_BxP, cfg.rope_theta)
            k_BxTxGxK = rope(k_BxTxGxK, positions_BxT, cfg.rope_theta)
        k_BxTxGxK, v_BxTxGxK = gather_length(k_BxTxGxK), gather_length(v_BxTxGxK)
        h_out = _attend(cfg, qh_BxTxNxK, k_BxTxGxK, v_BxTxGxK, content_mask)
        g_out = _attend(cfg, qg_BxPxNxK, k_BxTxGxK, v_BxTxGxK, query_mask)
        return (constrain(out(h_out), ("batch", "seq", "act_embed")),
                constrain(out(g_out), ("batch", None, "act_embed")))


class XLNetBlock(nn.Module):
    """Pre-norm block over both streams (h, g), every weight shared between them."""
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, streams, positions_BxT, q_positions_BxP, content_mask, query_mask):
        cfg = self.cfg
        h_BxTxD, g_BxPxD = streams
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attn_norm, mlp_norm = norm(cfg, "attn_norm"), norm(cfg, "mlp_norm")
        mlp = Mlp(cfg, residual_std(cfg), name="mlp")
        a_h, a_g = TwoStreamAttention(cfg, residual_std(cfg), name="attn")(
            attn_norm(h_BxTxD), attn_norm(g_BxPxD), positions_BxT, q_positions_BxP,
            content_mask, query_mask)
        h_BxTxD, g_BxPxD = h_BxTxD + drop(a_h), g_BxPxD + drop(a_g)
        h_BxTxD = h_BxTxD + drop(mlp(mlp_norm(h_BxTxD)))
        g_BxPxD = g_BxPxD + drop(mlp(mlp_norm(g_BxPxD)))
        return (constrain(h_BxTxD, ("batch", "seq", "act_embed")),
                constrain(g_BxPxD, ("batch", None, "act_embed"))), None


class XLNetLM(nn.Module):
    """tokens_BxT -> logits_BxPxV (float32) of the tokens at `predict_BxP`, from the query
    stream.

    `order_BxT` is each token's rank in its segment's factorisation order (data/plm.py);
    `segment_ids_BxT` (0 = padding) and `positions_BxT` as in the decoder. Defaults: one
    unpacked row, no permutation (see `permutation_masks`), every position predicted. With
    `hidden=True` it returns the final-normed content stream h_BxTxD instead.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None, order_BxT: jax.Array | None = None,
                 predict_BxP: jax.Array | None = None, *, train: bool = False,
                 hidden: bool = False) -> jax.Array:
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((B, T), jnp.int32)
        if predict_BxP is None:
            predict_BxP = jnp.broadcast_to(jnp.arange(T), (B, T))
        content_mask, query_mask = permutation_masks(order_BxT, segment_ids_BxT, predict_BxP)
        q_positions_BxP = jnp.take_along_axis(positions_BxT, predict_BxP, axis=1)
        embed = token_embedding(cfg)
        drop = nn.Dropout(cfg.dropout, deterministic=not train)
        h_BxTxD = constrain(drop(embed(tokens_BxT)), ("batch", "seq", "act_embed"))
        mask_emb = self.param("mask_emb", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("embed",)), (cfg.d_model,), cfg.weights_dtype)
        g_BxPxD = drop(jnp.broadcast_to(mask_emb.astype(h_BxTxD.dtype),
                                        predict_BxP.shape + (cfg.d_model,)))
        h_BxTxD, g_BxPxD = stack(cfg, XLNetBlock, cfg.n_layers, (h_BxTxD, g_BxPxD),
                                 positions_BxT, q_positions_BxP, content_mask, query_mask,
                                 deterministic=not train)
        final_norm = norm(cfg, "final_norm")
        if hidden:
            return final_norm(h_BxTxD)
        g_BxPxD = final_norm(g_BxPxD)
        if cfg.tie_embeddings:
            logits_BxPxV = tied_logits(embed, g_BxPxD)
        else:
            logits_BxPxV = dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="lm_head")(g_BxPxD)
        return constrain(logits_BxPxV.astype(jnp.float32), ("batch", None, "act_vocab"))
