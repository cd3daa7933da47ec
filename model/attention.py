"""Multi-head attention with grouped KV heads, RoPE, segment masks and a decoding KV cache.

The kernel is `jax.nn.dot_product_attention`: cuDNN flash attention on GPU, XLA elsewhere.
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
                 kv_segment_ids_BxS: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        q_BxTxNxK = dense(cfg, (cfg.n_heads, cfg.head_size), ("embed", "heads", "head_dim"),
                          name="query")(x_BxTxD)
        q_BxTxNxK = constrain(q_BxTxNxK, ("batch", "seq", "act_heads", "head_dim"))
        is_causal = False
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
                mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT,
                                                                          segment_ids_BxT)

        k_BxSxGxK, v_BxSxGxK = gather_length(k_BxSxGxK), gather_length(v_BxSxGxK)
        out_BxTxNxK = jax.nn.dot_product_attention(
            q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask=mask, is_causal=is_causal,
            implementation=attention_impl(cfg, self.decode))
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
