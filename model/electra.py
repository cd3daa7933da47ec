"""ELECTRA (Clark et al. 2020): a small MLM generator and an encoder discriminator in one module.

Both halves share the embeddings (token, position, type, norm), as in the paper, and live in one
parameter tree, so the train state, its sharding and checkpoints treat ELECTRA like any model.
The generator is the discriminator's config narrowed by `model.generator_scale`
(ModelConfig.generator_config); when narrower, it projects the shared embeddings down to its
width ("embed_proj") and its MLM head projects back up to the tied output embedding.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from model.config import ModelConfig
from model.encoder import Embeddings, EncoderStack, MlmHead, default_positions
from model.layers import constrain, dense, gelu


class Generator(nn.Module):
    """Embedded inputs (shared width E) -> MLM logits BxTxV."""
    cfg: ModelConfig          # the generator's own (narrow) config
    embed_width: int

    @nn.compact
    def __call__(self, x_BxTxE: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array | None, embeddings: Embeddings, *,
                 train: bool) -> jax.Array:
        cfg = self.cfg
        x_BxTxD = x_BxTxE
        if cfg.d_model != self.embed_width:
            x_BxTxD = dense(cfg, cfg.d_model, ("embed", "embed_out"), name="embed_proj")(x_BxTxE)
            x_BxTxD = constrain(x_BxTxD, ("batch", "seq", "act_embed"))
        h_BxTxD = EncoderStack(cfg, name="encoder")(x_BxTxD, positions_BxT, segment_ids_BxT,
                                                     train=train)
        return MlmHead(cfg, self.embed_width, name="mlm_head")(h_BxTxD, embeddings)


class RtdHead(nn.Module):
    """Replaced-token detection: dense, gelu, one logit per token (>0: "replaced")."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        h_BxTxD = gelu(cfg, dense(cfg, cfg.d_model, ("embed", "embed_out"), name="transform")(
            h_BxTxD))
        return dense(cfg, 1, ("embed", None), name="out")(h_BxTxD)[..., 0].astype("float32")


class Discriminator(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array | None, *, train: bool,
                 hidden: bool = False) -> jax.Array:
        h_BxTxD = EncoderStack(self.cfg, name="encoder")(x_BxTxD, positions_BxT, segment_ids_BxT,
                                                          train=train)
        return h_BxTxD if hidden else RtdHead(self.cfg, name="rtd_head")(h_BxTxD)


class ElectraLM(nn.Module):
    """`generator_logits` (MLM, BxTxV) and `discriminator_logits` (replaced-token, BxT) over the
    same embeddings; calling the module runs both on one input (which creates every parameter).
    Arguments as EncoderLM's: positions, segment ids (0 = padding) and type ids default to one
    unpacked example per row."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embeddings = Embeddings(cfg)
        self.generator = Generator(cfg.generator_config(), cfg.d_model)
        self.discriminator = Discriminator(cfg)

    def _embed(self, tokens_BxT, positions_BxT, type_ids_BxT, train):
        if positions_BxT is None:
            positions_BxT = default_positions(tokens_BxT)
        return self.embeddings(tokens_BxT, positions_BxT, type_ids_BxT, train=train), positions_BxT

    def generator_logits(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                         segment_ids_BxT: jax.Array | None = None,
                         type_ids_BxT: jax.Array | None = None, *, train: bool = False
                         ) -> jax.Array:
        x_BxTxD, positions_BxT = self._embed(tokens_BxT, positions_BxT, type_ids_BxT, train)
        return self.generator(x_BxTxD, positions_BxT, segment_ids_BxT, self.embeddings,
                              train=train)

    def discriminator_logits(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                             segment_ids_BxT: jax.Array | None = None,
                             type_ids_BxT: jax.Array | None = None, *, train: bool = False
                             ) -> jax.Array:
        x_BxTxD, positions_BxT = self._embed(tokens_BxT, positions_BxT, type_ids_BxT, train)
        return self.discriminator(x_BxTxD, positions_BxT, segment_ids_BxT, train=train)

    def encode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, type_ids_BxT: jax.Array | None = None,
               *, train: bool = False) -> jax.Array:
        """The discriminator's hidden states h_BxTxD (what fine-tuning heads read)."""
        x_BxTxD, positions_BxT = self._embed(tokens_BxT, positions_BxT, type_ids_BxT, train)
        return self.discriminator(x_BxTxD, positions_BxT, segment_ids_BxT, train=train,
                                  hidden=True)

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None, type_ids_BxT: jax.Array | None = None,
                 *, train: bool = False) -> dict[str, jax.Array]:
        args = (tokens_BxT, positions_BxT, segment_ids_BxT, type_ids_BxT)
        return {"mlm_logits": self.generator_logits(*args, train=train),
                "rtd_logits": self.discriminator_logits(*args, train=train)}
