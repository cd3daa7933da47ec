"""T5's bucketed relative position bias (`model.pos="relative_bias"`).

Each stack (the encoder; the decoder's self-attention) owns one table of `rel_buckets` x heads
learned scalars and computes the bias once, B x N x T x S, which every layer's attention adds to
its logits (T5 keeps the table in the first layer and passes the bias on; Hugging Face's
`relative_attention_bias` of block 0 is this table). Cross-attention has none. A key at relative
offset key_pos - query_pos falls in a bucket: in the encoder half the buckets are for keys after
the query and half for those before (bidirectional), in the decoder all are for keys before it;
of each half, the first half are exact offsets and the rest grow logarithmically up to
`rel_max_distance`, beyond which all share the last bucket. So any length fits.

Positions are each token's own (they restart in each packed example), so the bias is per row;
in decode mode the stack caches the position of every key slot, so a query at step i gets the
bias against all cached keys.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.config import ModelConfig
from model.layers import constrain


@functools.lru_cache(maxsize=None)
def bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every offset in [-max_distance, max_distance] (index offset + max_distance);
    every offset beyond saturates to the bucket of the nearest end. Mesh TensorFlow's (and Hugging
    Face's `_relative_position_bucket`) float32 arithmetic, done once on the host, so the buckets
    do not depend on the accelerator's log."""
    relative = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(relative.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + np.where(relative < max_exact, 0, scaled).astype(np.int64),
                       num_buckets - 1)
    return (buckets + np.where(relative < max_exact, relative, large)).astype(np.int32)


def relative_buckets(relative: jax.Array, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> jax.Array:
    """T5's bucket of each relative offset (key position - query position), any int shape."""
    table = jnp.asarray(bucket_table(bidirectional, num_buckets, max_distance))
    return table[jnp.clip(relative, -max_distance, max_distance) + max_distance]


class RelativeBias(nn.Module):
    """(query positions B x T[, key positions B x S]) -> bias B x N x T x S in the compute dtype.

    Keys default to the queries (self-attention). In `decode` mode the key positions are cached
    ("cache" collection, `cached_position`), sized by the input the cache was created with, as
    the attention's keys are."""
    cfg: ModelConfig
    bidirectional: bool
    decode: bool = False

    @nn.compact
    def __call__(self, q_positions_BxT: jax.Array,
                 k_positions_BxS: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        table_RxN = self.param("table", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("pos", "heads")),
            (cfg.rel_buckets, cfg.n_heads), cfg.weights_dtype)
        q_positions_BxT = q_positions_BxT.astype(jnp.int32)
        if k_positions_BxS is None:
            k_positions_BxS = (self._cached(q_positions_BxT) if self.decode
                               else q_positions_BxT)
        relative_BxTxS = k_positions_BxS[:, None, :] - q_positions_BxT[:, :, None]
        buckets_BxTxS = relative_buckets(relative_BxTxS, self.bidirectional, cfg.rel_buckets,
                                         cfg.rel_max_distance)
        bias_BxTxSxN = jnp.take(table_RxN.astype(cfg.compute_dtype), buckets_BxTxS, axis=0)
        # laid out like the attention logits it is added to (rows, heads, query blocks)
        return constrain(jnp.transpose(bias_BxTxSxN, (0, 3, 1, 2)),
                         ("batch", "act_heads", "seq", None))

    def _cached(self, positions_BxT: jax.Array) -> jax.Array:
        """Writes this chunk's positions at the cache index; returns every slot's position."""
        initialised = self.has_variable("cache", "cached_position")
        cached = self.variable("cache", "cached_position", jnp.zeros, positions_BxT.shape,
                               jnp.int32)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:   # cache creation: shapes only
            return positions_BxT
        cached.value = lax.dynamic_update_slice(cached.value, positions_BxT, (0, index.value))
        index.value = index.value + positions_BxT.shape[1]
        return cached.value
