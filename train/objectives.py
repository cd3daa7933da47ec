"""Training objectives: batch + model -> summed loss, summed weight and summed metrics.

Objectives return sums, not means, so micro-batches (gradient accumulation) and shards combine
exactly: the step divides by the total weight of the whole global batch once. Every objective is
`objective(model, params, batch, *, rng, train, z_loss) -> (total_loss_sum, sums)` where `sums`
holds at least "loss" (summed main loss) and "weight" (what it is averaged over).

Batch layouts (data/pipeline.py produces them; int32 unless noted, B rows):
  clm              inputs, targets, positions, segment_ids [B,T]; weights [B,T] float32
  mlm, electra     inputs (masked), targets (original ids), positions, segment_ids, type_ids
                   (0 = first sentence, 1 = second) [B,T]; weights [B,T] float32 (1 where the
                   token was selected for prediction); with sentence pairs also pair_labels [B]
                   (1 = true next / right order) and pair_weights [B] float32
  span_corruption, encoder_inputs, encoder_positions, encoder_segment_ids [B,T];
  prefix_lm        decoder_inputs, decoder_targets, decoder_positions, decoder_segment_ids [B,S];
                   decoder_weights [B,S] float32
segment_ids are 1, 2, ... per packed example and 0 for padding, in every layout.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]
Objective = Callable[..., tuple[jax.Array, Sums]]


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                        z_loss: float = 0.0) -> tuple[jax.Array, Sums]:
    """Summed weighted next-token cross entropy (+ z-loss), with metric sums."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], -1)[..., 0]
    ce_sum = jnp.sum((log_z_BxT - target_logit_BxT) * weights_BxT)
    z_sum = jnp.sum(jnp.square(log_z_BxT) * weights_BxT)
    correct = jnp.sum((jnp.argmax(logits_BxTxV, -1) == targets_BxT) * weights_BxT)
    total = ce_sum + z_loss * z_sum
    return total, {"loss": ce_sum, "z_loss": z_sum, "accuracy": correct,
                   "weight": jnp.sum(weights_BxT)}


def clm(model: nn.Module, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array,
        train: bool, z_loss: float = 0.0) -> tuple[jax.Array, Sums]:
    """Causal LM: predict `targets` from `inputs` inside each packed segment."""
    logits_BxTxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                               batch["segment_ids"], train=train, rngs={"dropout": rng})
    return token_cross_entropy(logits_BxTxV, batch["targets"], batch["weights"], z_loss)


OBJECTIVES: dict[str, Objective] = {"clm": clm}
