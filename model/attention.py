"""Multi-head attention with grouped KV heads, RoPE, segment masks and a decoding KV cache.

The kernel is cuDNN flash attention on GPU (`jax.nn.dot_product_attention`, or for packed
segments cuDNN's packed layout, see `cudnn_packed_attention`) and `xla_attention` elsewhere.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from model.config import ModelConfig
from model.layers import constrain, dense, rope


def segment_mask(q_segments_BxT: jax.Array, kv_segments_BxS: jax.Array) -> jax.Array:
    """B x 1 x T x S: a query sees keys of its own segment; segment 0 is padding."""
    same = q_segments_BxT[:, :, None] == kv_segments_BxS[:, None, :]
    return (same & (kv_segments_BxS[:, None, :] != 0))[:, None]


def xla_attention(q_BxTxNxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                  mask: jax.Array | None, is_causal: bool, bias_BxNxTxS: jax.Array | None = None,
                  scale: float | None = None) -> jax.Array:
    """Softmax attention as plain einsums, the softmax in float32; what
    `jax.nn.dot_product_attention(implementation="xla")` computes, with less memory traffic: the
    scale (default K^-0.5) is applied to the queries (not the B x N x T x S logits), the causal
    mask is a constant, and heads keep four dimensions unless KV heads are grouped. `bias`
    (T5's relative positions) is added to the logits before the mask."""
    B, T, N, K = q_BxTxNxK.shape
    S, G = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    scale = K ** -0.5 if scale is None else scale
    if scale != 1.0:
        q_BxTxNxK = q_BxTxNxK * jnp.asarray(scale, q_BxTxNxK.dtype)
    if is_causal:
        causal_TxS = jnp.tril(jnp.ones((T, S), bool))[None, None]
        mask = causal_TxS if mask is None else mask & causal_TxS
    if G == N:
        logits = jnp.einsum("btnk,bsnk->bnts", q_BxTxNxK, k_BxSxGxK,
                            preferred_element_type=jnp.float32)
    else:  # N = G * R query heads share each KV head: B x G x R x T x S logits
        q_BxTxGxRxK = q_BxTxNxK.reshape(B, T, G, N // G, K)
        logits = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK,
                            preferred_element_type=jnp.float32)
        mask = None if mask is None else mask[:, :, None]
        if bias_BxNxTxS is not None:
            bias_BxNxTxS = bias_BxNxTxS.reshape(B, G, N // G, T, S)
    if bias_BxNxTxS is not None:
        logits = logits + bias_BxNxTxS.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxGxK.dtype)
    if G == N:
        return jnp.einsum("bnts,bsnk->btnk", probs, v_BxSxGxK)
    return jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK).reshape(B, T, N, K)


def packed_lengths(segment_ids_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Segment lengths B x T and start offsets B x (T+1) of packed rows, -1 past the last
    segment: cuDNN's packed layout. Segments must be contiguous and numbered 1, 2, ... in row
    order with padding (0) only at the end, as data/packing.py writes them; T slots are enough
    for any row."""
    B, T = segment_ids_BxT.shape
    ids_BxM = jnp.arange(1, T + 1, dtype=jnp.int32)[None]
    lengths_BxM = jnp.sum(segment_ids_BxT[:, None, :] == ids_BxM[:, :, None], axis=-1,
                          dtype=jnp.int32)
    present_BxM = lengths_BxM > 0
    starts_BxM = jnp.cumsum(lengths_BxM, axis=-1, dtype=jnp.int32) - lengths_BxM
    lengths_BxM = jnp.where(present_BxM, lengths_BxM, -1)
    offsets_BxM = jnp.where(present_BxM, starts_BxM, -1)
    return lengths_BxM, jnp.concatenate([offsets_BxM, jnp.full((B, 1), -1, jnp.int32)], -1)


def cudnn_packed_attention(q_BxTxNxK: jax.Array, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array,
                           segment_ids_BxT: jax.Array, is_causal: bool,
                           scale: float | None = None) -> jax.Array:
    """cuDNN flash attention over packed segments from their lengths and offsets, not a dense
    B x T x T mask (jax.nn.dot_product_attention takes only one length per row). Needs a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # GPU only: no public API yet
    lengths_BxM, offsets_BxM1 = packed_lengths(segment_ids_BxT.astype(jnp.int32))
    mask_type = cudnn.MaskType.PADDING_CAUSAL if is_causal else cudnn.MaskType.PADDING
    out_BxTxNxK = cudnn.dot_product_attention(
        q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, None, None, lengths_BxM, lengths_BxM, offsets_BxM1,
        offsets_BxM1, scale=q_BxTxNxK.shape[-1] ** -0.5 if scale is None else scale,
        mask_type=mask_type)
    # padding tokens lie in no segment, and cuDNN leaves their rows undefined
    return jnp.where((segment_ids_BxT != 0)[:, :, None, None], out_BxTxNxK, 0)


def gather_length(kv_BxSxGxK: jax.Array) -> jax.Array:
    """Keys or values whole along the length S, for sequence (context) parallelism.

    Queries, like every activation, stay split along the length over the `sequence` mesh axis
    (the "seq" rule); each query block needs every key, so K and V are all-gathered over it
    (a no-op when nothing splits the length). The masks are computed on the global shapes, so
    the partitioner offsets causal and segment masks per block by itself. Ring attention would
    instead pass K/V blocks around with an online softmax, overlapping the transfers with
    compute, at the cost of a hand-written kernel in place of `dot_product_attention`.
    """
    return constrain(kv_BxSxGxK, ("batch", None, "act_kv_heads", "head_dim"))


def attention_impl(cfg: ModelConfig, decode: bool) -> str:
    if cfg.attention != "auto":
        return cfg.attention
    if cfg.pos == "relative_bias":   # a learned bias: the xla kernel (see ModelConfig)
        return "xla"
    on_gpu = jax.default_backend() == "gpu"
    fast_dtype = cfg.dtype in ("bfloat16", "float16")
    return "cudnn" if on_gpu and fast_dtype and not decode else "xla"


class Attention(nn.Module):
    """Self-attention (causal or not) or, with `cross=True`, cross-attention to `kv_BxSxD`.

    In `decode` mode, self-attention appends keys and values to a cache in the "cache"
    collection, sized by the length of the input the cache was initialised with; queries then
    attend to every filled slot up to their own. Cache slot order is time order; `positions_BxT`
    carries each token's position for RoPE, so left-padded rows and rows of different lengths
    decode correctly. Cross-attention in `decode` mode caches the projected keys and values of
    the `kv_BxSxD` it is given; a later call passes `kv_BxSxD=None` to reuse them, so a decoding
    step never re-projects the whole encoder output.
    """
    cfg: ModelConfig
    out_std: float
    causal: bool = True
    decode: bool = False
    cross: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array | None, kv_BxSxD: jax.Array | None = None,
                 kv_segment_ids_BxS: jax.Array | None = None,
                 bias_BxNxTxS: jax.Array | None = None) -> jax.Array:
        """`bias_BxNxTxS`: added to the logits (model/relative.py, T5's relative positions)."""
        cfg = self.cfg
        # T5 (model.qk_scale=False) does not scale the logits; its query init carries the factor
        q_std = None if cfg.qk_scale else cfg.init_std * cfg.head_size ** -0.5
        q_BxTxNxK = dense(cfg, (cfg.n_heads, cfg.head_size), ("embed", "heads", "head_dim"),
                          std=q_std, name="query")(x_BxTxD)
        q_BxTxNxK = constrain(q_BxTxNxK, ("batch", "seq", "act_heads", "head_dim"))
        is_causal, packed = False, None
        if self.cross:
            k_BxSxGxK, v_BxSxGxK, kv_segment_ids_BxS = self._cross_keys_values(
                kv_BxSxD, kv_segment_ids_BxS)
            mask = None if kv_segment_ids_BxS is None else segment_mask(
                segment_ids_BxT if segment_ids_BxT is not None else
                jnp.ones(x_BxTxD.shape[:2], jnp.int32), kv_segment_ids_BxS)
        else:
            k_BxSxGxK, v_BxSxGxK = self._keys_values(x_BxTxD)
            if cfg.pos == "rope":
                q_BxTxNxK = rope(q_BxTxNxK, positions_BxT, cfg.rope_theta)
                k_BxSxGxK = rope(k_BxSxGxK, positions_BxT, cfg.rope_theta)
            if self.decode:  # the cache mask is causal in slot order already
                k_BxSxGxK, v_BxSxGxK, mask = self._cached(k_BxSxGxK, v_BxSxGxK, segment_ids_BxT)
            else:
                is_causal = self.causal
                packed = segment_ids_BxT
                mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT,
                                                                          segment_ids_BxT)

        k_BxSxGxK, v_BxSxGxK = gather_length(k_BxSxGxK), gather_length(v_BxSxGxK)
        impl = attention_impl(cfg, self.decode)
        scale = cfg.head_size ** -0.5 if cfg.qk_scale else 1.0
        if impl == "xla":
            out_BxTxNxK = xla_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask, is_causal,
                                        bias_BxNxTxS, scale)
        elif packed is not None and cfg.cudnn_segments == "lengths":
            out_BxTxNxK = cudnn_packed_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, packed,
                                                 is_causal, scale)
        else:
            out_BxTxNxK = jax.nn.dot_product_attention(
                q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask=mask, is_causal=is_causal, scale=scale,
                implementation=impl)
        out_BxTxNxK = constrain(out_BxTxNxK, ("batch", "seq", "act_heads", "head_dim"))
        out_BxTxD = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                          std=self.out_std, name="out")(out_BxTxNxK)
        return constrain(out_BxTxD, ("batch", "seq", "act_embed"))

    def _keys_values(self, kv_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        names = ("embed", "kv_heads", "head_dim")
        shape = (cfg.kv_heads, cfg.head_size)
        k_BxSxGxK = dense(cfg, shape, names, name="key")(kv_BxSxD)
        v_BxSxGxK = dense(cfg, shape, names, name="value")(kv_BxSxD)
        return (constrain(k_BxSxGxK, ("batch", "seq", "act_kv_heads", "head_dim")),
                constrain(v_BxSxGxK, ("batch", "seq", "act_kv_heads", "head_dim")))

    def _cross_keys_values(self, kv_BxSxD, kv_segment_ids_BxS):
        """Keys/values of the encoder output; in decode mode written to or read from the cache."""
        if kv_BxSxD is None:
            if not (self.decode and self.has_variable("cache", "cross_key")):
                raise ValueError("cross-attention needs kv_BxSxD (the encoder output); only a "
                                 "decode-mode call after one that passed it may leave it out")
            return (self.get_variable("cache", "cross_key"),
                    self.get_variable("cache", "cross_value"),
                    self.get_variable("cache", "cross_segment"))
        k_BxSxGxK, v_BxSxGxK = self._keys_values(kv_BxSxD)
        if not self.decode:
            return k_BxSxGxK, v_BxSxGxK, kv_segment_ids_BxS
        if kv_segment_ids_BxS is None:
            kv_segment_ids_BxS = jnp.ones(kv_BxSxD.shape[:2], jnp.int32)
        for name, value in (("cross_key", k_BxSxGxK), ("cross_value", v_BxSxGxK),
                            ("cross_segment", kv_segment_ids_BxS.astype(jnp.int32))):
            self.put_variable("cache", name, value)
        return k_BxSxGxK, v_BxSxGxK, kv_segment_ids_BxS

    def _cached(self, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT):
        """Writes this chunk's keys/values at the cache index; returns the whole cache + mask."""
        initialised = self.has_variable("cache", "cached_key")
        batch, length = k_BxTxGxK.shape[:2]
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((batch, length), jnp.int32)
        key = self.variable("cache", "cached_key", jnp.zeros, k_BxTxGxK.shape, k_BxTxGxK.dtype)
        value = self.variable("cache", "cached_value", jnp.zeros, v_BxTxGxK.shape, v_BxTxGxK.dtype)
        segments = self.variable("cache", "cached_segment", jnp.zeros, (batch, length), jnp.int32)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:  # cache creation: shapes only, attend causally within the input
            causal_TxT = jnp.tril(jnp.ones((length, length), bool))
            return k_BxTxGxK, v_BxTxGxK, causal_TxT[None, None] & segment_mask(
                segment_ids_BxT, segment_ids_BxT)
        i = index.value
        key.value = lax.dynamic_update_slice(key.value, k_BxTxGxK, (0, i, 0, 0))
        value.value = lax.dynamic_update_slice(value.value, v_BxTxGxK, (0, i, 0, 0))
        segments.value = lax.dynamic_update_slice(
            segments.value, segment_ids_BxT.astype(jnp.int32), (0, i))
        index.value = i + length
        slots_S = jnp.arange(key.value.shape[1])
        causal_TxS = slots_S[None, :] <= (i + jnp.arange(length))[:, None]
        mask = causal_TxS[None, None] & segment_mask(segment_ids_BxT, segments.value)
        return key.value, value.value, mask
