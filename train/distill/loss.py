"""The distillation loss (Hinton et al. 2015), on top of any objective that is a `Split`.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard

per predicted position: every weighted next-token position of a decoder (the loss mask, which
segments and padding already zero), the selected MLM positions of an encoder, each row of a
classifier, each tagged word of a tagger, the target tokens of text2text. T^2 keeps the soft
gradients' scale independent of T. The teacher runs the same forward pass in eval mode (no
dropout) inside the same jitted step, under stop_gradient. Like every objective it returns sums
(the step divides by the summed weight once): "loss" stays the student's hard-label loss, so a
distilled run's curves read like a run trained from scratch; "distill_kl" is the mean KL at T
and "distill_loss" the mean of what is minimised.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from train.objectives import Objective, Split, Sums


def soft_kl(teacher_BxTxV: jax.Array, student_BxTxV: jax.Array, weights_BxT: jax.Array,
            temperature: float) -> jax.Array:
    """sum over positions of weight * KL(softmax(teacher / T) || softmax(student / T))."""
    log_p_BxTxV = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    log_q_BxTxV = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    kl_BxT = jnp.sum(jnp.exp(log_p_BxTxV) * (log_p_BxTxV - log_q_BxTxV), axis=-1)
    return jnp.sum(kl_BxT * weights_BxT)


def distilled(split: Split, teacher_model: nn.Module, alpha: float, temperature: float
              ) -> Objective:
    """The objective `split` with the teacher's soft targets mixed in (see the module
    docstring); called with `teacher=` the teacher's params (train/step.py's `Teacher`)."""
    def objective(model: nn.Module, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array,
                  train: bool, teacher: Any, z_loss: float = 0.0, **weights: float
                  ) -> tuple[jax.Array, Sums]:
        out = split.forward(model, params, batch, rng=rng, train=train)
        hard_total, sums = split.loss(out, batch, z_loss, **weights)
        teacher_out = split.forward(teacher_model, teacher, batch, rng=rng, train=False)
        teacher_BxTxV, _ = split.logits(teacher_out, batch)
        student_BxTxV, weights_BxT = split.logits(out, batch)
        kl_sum = soft_kl(jax.lax.stop_gradient(teacher_BxTxV), student_BxTxV,
                         weights_BxT.astype(jnp.float32), temperature)
        total = alpha * temperature ** 2 * kl_sum + (1.0 - alpha) * hard_total
        return total, {**sums, "distill_kl": kl_sum, "distill_loss": total}
    return objective
