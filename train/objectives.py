"""Training objectives: batch + model -> summed loss, summed weight and summed metrics.

Objectives return sums, not means, so micro-batches (gradient accumulation) and shards combine
exactly: the step divides by the total weight of the whole global batch once. Every objective is
`objective(model, params, batch, *, rng, train, z_loss) -> (total_loss_sum, sums)` where `sums`
holds at least "loss" (summed main loss) and "weight" (what it is averaged over). Most are a
`Split` (a forward pass, then the loss of its outputs), which distillation builds on.

Batch layouts (data/pipeline.py produces them; int32 unless noted, B rows):
  clm              inputs, targets, positions, segment_ids [B,T]; weights [B,T] float32
  mlm, electra     inputs (masked), targets (original ids), positions, segment_ids, type_ids
                   (0 = first sentence, 1 = second) [B,T]; weights [B,T] float32 (1 where the
                   token was selected for prediction); with sentence pairs also pair_labels [B]
                   (1 = true next / right order) and pair_weights [B] float32
  span_corruption, encoder_inputs, encoder_positions, encoder_segment_ids [B,T];
  prefix_lm,       decoder_inputs, decoder_targets, decoder_positions, decoder_segment_ids [B,S];
  denoise          decoder_weights [B,S] float32
  plm              inputs (the text, unmasked), order (rank of each token in its segment's
                   factorisation order), positions, segment_ids [B,T]; predict_positions (where
                   the P prediction slots point), targets [B,P]; weights [B,P] float32 (0 for an
                   unused slot)
  classify, tag,    one example a row (see data/tasks.py): inputs, positions, segment_ids,
  text2text        type_ids [B,T] with labels [B] + label_weights [B], or tags [B,T] +
                   tag_weights [B,T]; text2text rows are clm's or span_corruption's layout
segment_ids are 1, 2, ... per packed example and 0 for padding, in every layout.

An objective with two losses of different denominators (MLM + sentence pair, ELECTRA's generator
+ discriminator) rescales the second to the first's weight, so that total / weight is the sum of
the two means, as in the papers (exactly per micro-batch); the second is weighted by the
config's lambda (train.pair_weight, train.discriminator_weight), which families.loss binds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from configs.base import get_config as base_config

Sums = dict[str, jax.Array]
Objective = Callable[..., tuple[jax.Array, Sums]]


@dataclasses.dataclass(frozen=True)
class Split:
    """An objective split into its forward pass and the loss of what that returns, so that
    knowledge distillation (train/distill/) can run the same forward pass on a teacher and
    compare the distributions `logits` picks out. Called, it is the objective."""
    forward: Callable[..., Any]                                  # (model, params, batch, *,
    #                                                              rng, train) -> outputs
    loss: Callable[..., tuple[jax.Array, Sums]]                 # (outputs, batch, z_loss,
    #                                                              **weights)
    logits: Callable[[Any, dict], tuple[jax.Array, jax.Array]]  # (outputs, batch) ->
    #                                   logits_BxTxV and weights_BxT of the predicted positions

    def __call__(self, model: nn.Module, params: Any, batch: dict[str, jax.Array], *,
                 rng: jax.Array, train: bool, z_loss: float = 0.0, **weights: float
                 ) -> tuple[jax.Array, Sums]:
        """`weights`: the loss's own lambdas (mlm: pair_weight), as families.loss binds them."""
        return self.loss(self.forward(model, params, batch, rng=rng, train=train), batch, z_loss,
                         **weights)


def _on_tokens(targets: str, weights: str) -> tuple[Callable, Callable]:
    """(loss, logits) of a Split whose forward returns logits_BxTxC of `batch[targets]`,
    weighted by `batch[weights]` (a classifier's [B] labels are its logits' [B, 1])."""
    def loss(logits, batch, z_loss):
        shape = logits.shape[:-1]
        return token_cross_entropy(logits, batch[targets].reshape(shape),
                                   batch[weights].reshape(shape), z_loss)
    return loss, lambda logits, batch: (logits, batch[weights].reshape(logits.shape[:-1]))


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                        z_loss: float = 0.0) -> tuple[jax.Array, Sums]:
    """Summed weighted next-token cross entropy (+ z-loss), with metric sums."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    # one max over the vocabulary serves the stable log-sum-exp and the accuracy
    max_BxT = jax.lax.stop_gradient(jnp.max(logits_BxTxV, axis=-1))
    log_z_BxT = max_BxT + jnp.log(jnp.sum(jnp.exp(logits_BxTxV - max_BxT[..., None]), axis=-1))
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], -1)[..., 0]
    ce_sum = jnp.sum((log_z_BxT - target_logit_BxT) * weights_BxT)
    z_sum = jnp.sum(jnp.square(log_z_BxT) * weights_BxT)
    correct = jnp.sum((target_logit_BxT >= max_BxT) * weights_BxT)
    total = ce_sum + z_loss * z_sum
    return total, {"loss": ce_sum, "z_loss": z_sum, "accuracy": correct,
                   "weight": jnp.sum(weights_BxT)}


def _clm_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array,
                train: bool) -> jax.Array:
    """Causal LM: predict `targets` from `inputs` inside each packed segment."""
    return model.apply({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"], train=train, rngs={"dropout": rng})


clm = Split(_clm_logits, *_on_tokens("targets", "weights"))


def _rescaled(sums: Sums, weight: jax.Array, to_weight: jax.Array) -> Sums:
    """Sums over `weight` items, scaled so that dividing by `to_weight` gives their means."""
    ratio = to_weight / jnp.maximum(weight, 1.0)
    return {k: v * ratio for k, v in sums.items()}


def pair_cross_entropy(logits_Bx2: jax.Array, labels_B: jax.Array, weights_B: jax.Array
                       ) -> tuple[jax.Array, Sums]:
    """Summed sentence-pair (NSP/SOP) cross entropy and accuracy over weighted rows."""
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_Bx2, labels_B)
    correct_B = jnp.argmax(logits_Bx2, -1) == labels_B
    return jnp.sum(ce_B * weights_B), {"pair_loss": jnp.sum(ce_B * weights_B),
                                       "pair_accuracy": jnp.sum(correct_B * weights_B)}


PAIR_WEIGHT = base_config().train.pair_weight   # BERT adds the two losses: lambda = 1


def _mlm_outputs(model: nn.Module, params: Any, batch: dict[str, jax.Array], *,
                 rng: jax.Array, train: bool) -> dict[str, jax.Array]:
    return model.apply({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"], batch["type_ids"], train=train,
                       rngs={"dropout": rng})


def _mlm_loss(out: dict[str, jax.Array], batch: dict[str, jax.Array], z_loss: float,
              pair_weight: float = PAIR_WEIGHT) -> tuple[jax.Array, Sums]:
    """BERT: masked-token cross entropy on the weighted positions (its mean is "loss"), plus
    `pair_weight` times the mean sentence-pair loss when the batch has `pair_labels`."""
    total, sums = token_cross_entropy(out["mlm_logits"], batch["targets"], batch["weights"],
                                      z_loss)
    if "pair_labels" in batch:
        pair_weights_B = batch["pair_weights"].astype(jnp.float32)
        _, pair_sums = pair_cross_entropy(out["pair_logits"], batch["pair_labels"],
                                          pair_weights_B)
        pair_sums = _rescaled(pair_sums, jnp.sum(pair_weights_B), sums["weight"])
        total = total + pair_weight * pair_sums["pair_loss"]
        sums.update(pair_sums)
    return total, sums


mlm = Split(_mlm_outputs, _mlm_loss, lambda out, batch: (out["mlm_logits"], batch["weights"]))


# ELECTRA's lambda (the discriminator loss is ~50x smaller); train.discriminator_weight sets it
DISCRIMINATOR_WEIGHT = base_config().train.discriminator_weight


def electra(model: nn.Module, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array,
            train: bool, z_loss: float = 0.0,
            discriminator_weight: float = DISCRIMINATOR_WEIGHT) -> tuple[jax.Array, Sums]:
    """ELECTRA, generator and discriminator trained jointly.

    The generator's MLM predicts the selected (weighted) positions; a sample from its softmax
    (no gradient) replaces them; the discriminator labels every real token as original or
    replaced (a sample equal to the original counts as original). The minimised loss is
    generator MLM mean + discriminator_weight * discriminator BCE mean over real tokens, and
    "weight" counts the real tokens.
    """
    dropout_rng, sample_rng = jax.random.split(rng)
    context = (batch["positions"], batch["segment_ids"], batch["type_ids"])
    gen_logits_BxTxV = model.apply({"params": params}, batch["inputs"], *context, train=train,
                                   rngs={"dropout": jax.random.fold_in(dropout_rng, 0)},
                                   method=model.generator_logits)
    gen_total, gen_sums = token_cross_entropy(gen_logits_BxTxV, batch["targets"],
                                              batch["weights"], z_loss)
    sampled_BxT = jax.random.categorical(sample_rng, jax.lax.stop_gradient(gen_logits_BxTxV))
    selected_BxT = batch["weights"] > 0
    corrupted_BxT = jnp.where(selected_BxT, sampled_BxT, batch["targets"]).astype(jnp.int32)
    replaced_BxT = (corrupted_BxT != batch["targets"]).astype(jnp.float32)
    rtd_logits_BxT = model.apply({"params": params}, corrupted_BxT, *context, train=train,
                                 rngs={"dropout": jax.random.fold_in(dropout_rng, 1)},
                                 method=model.discriminator_logits)
    real_BxT = (batch["segment_ids"] != 0).astype(jnp.float32)
    bce_BxT = optax.sigmoid_binary_cross_entropy(rtd_logits_BxT, replaced_BxT)
    disc_sum = jnp.sum(bce_BxT * real_BxT)
    n_real = jnp.sum(real_BxT)
    gen = _rescaled({"generator_loss": gen_sums["loss"], "generator_accuracy":
                     gen_sums["accuracy"], "z_loss": gen_sums["z_loss"], "total": gen_total},
                    gen_sums["weight"], n_real)
    total = gen.pop("total") + discriminator_weight * disc_sum
    correct_BxT = (rtd_logits_BxT > 0) == (replaced_BxT > 0)
    return total, {"loss": gen["generator_loss"] + discriminator_weight * disc_sum, **gen,
                   "discriminator_loss": disc_sum,
                   "discriminator_accuracy": jnp.sum(correct_BxT * real_BxT),
                   "replaced": jnp.sum(replaced_BxT * real_BxT), "weight": n_real}


def _seq2seq_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array], *,
                    rng: jax.Array, train: bool) -> jax.Array:
    """Encoder-decoder cross entropy of `decoder_targets` (span corruption, prefix LM,
    denoising)."""
    return model.apply(
        {"params": params}, batch["encoder_inputs"], batch["decoder_inputs"],
        batch["encoder_positions"], batch["encoder_segment_ids"], batch["decoder_positions"],
        batch["decoder_segment_ids"], train=train, rngs={"dropout": rng})


seq2seq = Split(_seq2seq_logits, *_on_tokens("decoder_targets", "decoder_weights"))


def plm(model: nn.Module, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array,
        train: bool, z_loss: float = 0.0) -> tuple[jax.Array, Sums]:
    """XLNet permutation LM: cross entropy of the predicted tokens (the last 1/K of each
    factorisation order) from the query stream; "tokens_per_prediction" is the real tokens of
    the batch over the predicted ones (about K)."""
    logits_BxPxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                               batch["segment_ids"], batch["order"], batch["predict_positions"],
                               train=train, rngs={"dropout": rng})
    total, sums = token_cross_entropy(logits_BxPxV, batch["targets"], batch["weights"], z_loss)
    sums["tokens_per_prediction"] = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
    return total, sums


def _classify_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array], *,
                     rng: jax.Array, train: bool) -> jax.Array:
    """Sequence classification (data/tasks.py rows): cross entropy of `labels` over the rows
    weighted by `label_weights` (padding rows of an eval pass weigh 0); logits_Bx1xC."""
    logits_BxC = model.apply({"params": params}, batch["inputs"], batch["positions"],
                             batch["segment_ids"], batch["type_ids"], train=train,
                             rngs={"dropout": rng})
    return logits_BxC[:, None]


classify = Split(_classify_logits, *_on_tokens("labels", "label_weights"))


def _tag_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array,
                train: bool) -> jax.Array:
    """Token classification: cross entropy of `tags` on the first piece of each word."""
    return model.apply({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"], batch["type_ids"], train=train,
                       rngs={"dropout": rng})


tag = Split(_tag_logits, *_on_tokens("tags", "tag_weights"))


def _by_layout(batch: dict[str, jax.Array]) -> Split:
    """Conditional generation: a decoder's clm loss on the target tokens (the prompt weighs 0),
    or an encoder-decoder's seq2seq loss; the rows' layout says which."""
    return seq2seq if "encoder_inputs" in batch else clm


text2text = Split(lambda model, params, batch, **kw: _by_layout(batch).forward(
                      model, params, batch, **kw),
                  lambda out, batch, z_loss: _by_layout(batch).loss(out, batch, z_loss),
                  lambda out, batch: _by_layout(batch).logits(out, batch))


OBJECTIVES: dict[str, Objective] = {"clm": clm, "mlm": mlm, "electra": electra,
                                    "span_corruption": seq2seq, "prefix_lm": seq2seq,
                                    "denoise": seq2seq,
                                    "plm": plm,
                                    "classify": classify, "tag": tag, "text2text": text2text}
