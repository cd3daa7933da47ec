"""Turning next-token logits into tokens: vocabulary limit, temperature, top-k, top-p, stop test."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

NEG = float(jnp.finfo(jnp.float32).min)  # "never": finite, so log-softmax stays free of NaNs


def mask_vocab(logits_RxV: jax.Array, vocab_limit: int) -> jax.Array:
    """float32 logits with the ids a tokenizer does not have (>= vocab_limit) made impossible
    (the model's vocabulary may be padded beyond the tokenizer's)."""
    logits_RxV = logits_RxV.astype(jnp.float32)
    return jnp.where(jnp.arange(logits_RxV.shape[-1]) < vocab_limit, logits_RxV, NEG)


def filter_logits(logits_RxV: jax.Array, *, temperature: float, top_k: int, top_p: float,
                  vocab_limit: int) -> jax.Array:
    """Logits / temperature, with ids >= vocab_limit, outside the top k, or outside the top-p
    nucleus set to NEG.

    The nucleus is the smallest set of most likely tokens whose probability (after temperature
    and top-k) reaches `top_p`; tokens tied with its least likely member stay in it.
    """
    logits_RxV = mask_vocab(logits_RxV, vocab_limit) / max(temperature, 1e-6)
    if top_k > 0:
        kth_Rx1 = jax.lax.top_k(logits_RxV, top_k)[0][:, -1:]
        logits_RxV = jnp.where(logits_RxV < kth_Rx1, NEG, logits_RxV)
    if top_p < 1.0:
        sorted_RxV = jnp.sort(logits_RxV, axis=-1)[:, ::-1]
        probs_RxV = jax.nn.softmax(sorted_RxV, axis=-1)
        # a token is in the nucleus while the mass before it is still short of top_p
        mass_before_RxV = jnp.cumsum(probs_RxV, axis=-1) - probs_RxV
        cutoff_Rx1 = jnp.min(jnp.where(mass_before_RxV < top_p, sorted_RxV, jnp.inf), -1,
                             keepdims=True)
        logits_RxV = jnp.where(logits_RxV < cutoff_Rx1, NEG, logits_RxV)
    return logits_RxV


def choose(logits_RxV: jax.Array, rng: jax.Array, *, temperature: float, top_k: int,
           top_p: float, vocab_limit: int) -> jax.Array:
    """Next token ids: the argmax when temperature == 0, else a sample of the filtered logits."""
    if temperature == 0.0:
        return jnp.argmax(mask_vocab(logits_RxV, vocab_limit), axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_RxV, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_limit=vocab_limit)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def is_stop(tokens: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
    """Where `tokens` is one of the stop ids."""
    hit = jnp.zeros(tokens.shape, bool)
    for stop in stop_ids:
        hit = hit | (tokens == stop)
    return hit
