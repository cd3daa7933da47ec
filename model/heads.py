"""Task heads on any backbone: sequence classification and token classification (tagging).

`TaskModel` holds the family's own module as `backbone` (its parameters keep the names and
shapes of pretraining, under "backbone") and a new `head`. The backbone's hidden states come
from `features(backbone, tokens, positions, segment_ids, type_ids, train)`, which the family's
record supplies (train/families.py), and a sequence is pooled as the family does it:
"first" ([CLS], encoders), "last" (the last real token, decoders) or "mean" (over real tokens,
T5's encoder).

Shapes: B batch, T length, D d_model, C labels.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import constrain, dense

HEADS = ("classify", "tag")
POOLING = ("first", "last", "mean")


def pool(h_BxTxD: jax.Array, segment_ids_BxT: jax.Array, how: str) -> jax.Array:
    """One vector per row: the first token, the last real token (segment id > 0) or the mean
    of the real tokens."""
    if how == "first":
        return h_BxTxD[:, 0]
    real_BxT = (segment_ids_BxT > 0).astype(h_BxTxD.dtype)
    if how == "last":
        last_B = jnp.maximum(jnp.sum(real_BxT, axis=1).astype(jnp.int32) - 1, 0)
        return jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    total_BxD = jnp.einsum("btd,bt->bd", h_BxTxD, real_BxT)
    return total_BxD / jnp.maximum(jnp.sum(real_BxT, axis=1, keepdims=True), 1.0)


class ClassifierHead(nn.Module):
    """pooled_BxD -> dense + tanh (a BERT-style pooler) -> dropout -> logits_BxC (float32)."""
    cfg: ModelConfig
    n_labels: int
    dropout: float

    @nn.compact
    def __call__(self, pooled_BxD: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.cfg
        h_BxD = jnp.tanh(dense(cfg, cfg.d_model, ("embed", "embed_out"), name="pooler")(pooled_BxD))
        h_BxD = nn.Dropout(self.dropout, deterministic=not train)(h_BxD)
        return dense(cfg, self.n_labels, ("embed_out", None), name="out")(h_BxD).astype(
            jnp.float32)


class TokenHead(nn.Module):
    """h_BxTxD -> dropout -> logits_BxTxC (float32)."""
    cfg: ModelConfig
    n_labels: int
    dropout: float

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array, *, train: bool) -> jax.Array:
        h_BxTxD = nn.Dropout(self.dropout, deterministic=not train)(h_BxTxD)
        logits_BxTxC = dense(self.cfg, self.n_labels, ("embed", None), name="out")(h_BxTxD)
        return constrain(logits_BxTxC.astype(jnp.float32), ("batch", "seq", None))


class TaskModel(nn.Module):
    """(tokens_BxT, positions, segment_ids, type_ids) -> logits_BxC (classify) or logits_BxTxC
    (tag). Segment ids are 1 on real tokens and 0 on padding; one example per row."""
    cfg: ModelConfig
    backbone_module: Callable[[ModelConfig], nn.Module]
    features: Callable[..., jax.Array]
    pooling: str
    kind: str                        # one of HEADS
    n_labels: int
    dropout: float = 0.1
    n_prompt: int = 0                # soft-prompt vectors read before the tokens (0 = none)
    n_inputs: ClassVar[int] = 1      # token arrays `init` needs, whatever the family

    def setup(self):
        self.backbone = self.backbone_module(self.cfg)
        if self.n_prompt:
            self.prompt = self.param("prompt", nn.with_logical_partitioning(
                nn.initializers.normal(self.cfg.init_std), (None, "embed")),
                (self.n_prompt, self.cfg.d_model), self.cfg.weights_dtype)
        make = ClassifierHead if self.kind == "classify" else TokenHead
        self.head = make(self.cfg, self.n_labels, self.dropout)

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None, type_ids_BxT: jax.Array | None = None,
                 *, train: bool = False) -> jax.Array:
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(tokens_BxT)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32),
                                             tokens_BxT.shape)
        extra = {"prompt_PxD": self.prompt} if self.n_prompt else {}
        h_BxTxD = self.features(self.backbone, tokens_BxT, positions_BxT, segment_ids_BxT,
                                type_ids_BxT, train, **extra)
        if self.kind == "classify":
            return self.head(pool(h_BxTxD, segment_ids_BxT, self.pooling), train=train)
        return self.head(h_BxTxD, train=train)


def backbone_params(params: Any) -> Any:
    """The backbone's part of a TaskModel's params (the names pretraining used)."""
    return params["backbone"]
