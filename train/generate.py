"""Autoregressive decoding of a decoder LM with a KV cache inside one jitted `lax.while_loop`.

Prompts of different lengths are left-padded; each row's positions count only its real tokens,
so padding changes nothing. Sampling: greedy (temperature 0), temperature, top-k, top-p.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import model as model_lib
from model.config import ModelConfig


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens_BxP and segment_ids_BxP (1 real, 0 padding), prompts aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start with BOS)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        segments[i, width - len(p):] = 1
    return tokens, segments


def filter_logits(logits_BxV: jax.Array, *, temperature: float, top_k: int, top_p: float,
                  vocab_limit: int) -> jax.Array:
    """Logits with ids >= vocab_limit, outside the top k, or outside the top-p mass at -inf."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_limit, logits_BxV, neg)
    logits_BxV = logits_BxV / max(temperature, 1e-6)
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_Bx1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), -1,
                             keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, neg, logits_BxV)
    return logits_BxV


def choose(logits_BxV: jax.Array, rng: jax.Array, *, temperature: float, top_k: int,
           top_p: float, vocab_limit: int) -> jax.Array:
    """Next token ids: argmax when temperature == 0, else a sample from the filtered logits."""
    filtered = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_limit=vocab_limit)
    if temperature == 0.0:
        return jnp.argmax(filtered, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def init_cache(decoder: nn.Module, cfg: ModelConfig, batch: int, length: int) -> Any:
    """Zeroed KV cache with `length` slots per row."""
    shapes = jax.eval_shape(lambda: decoder.init(
        jax.random.PRNGKey(0), *model_lib.init_inputs(cfg, batch, length)))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "vocab_limit", "eos_id", "pad_id"))
def _decode(params, tokens_BxP, segments_BxP, rng, *, cfg: ModelConfig, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, vocab_limit: int, eos_id: int,
            pad_id: int) -> jax.Array:
    decoder = model_lib.build(cfg, decode=True)
    batch, width = tokens_BxP.shape
    pick = functools.partial(choose, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_limit=vocab_limit)
    positions_BxP = jnp.maximum(jnp.cumsum(segments_BxP, axis=1) - 1, 0)
    cache = init_cache(decoder, cfg, batch, width + max_new_tokens)
    logits, mutated = decoder.apply({"params": params, "cache": cache}, tokens_BxP, positions_BxP,
                                    segments_BxP, mutable=["cache"])
    first = pick(logits[:, -1], jax.random.fold_in(rng, 0))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, out, done, next_pos_B = carry
        token_B = out[:, i - 1]
        logits, mutated = decoder.apply({"params": params, "cache": cache}, token_B[:, None],
                                        next_pos_B[:, None], jnp.ones((batch, 1), jnp.int32),
                                        mutable=["cache"])
        new_B = jnp.where(done, pad_id, pick(logits[:, -1], jax.random.fold_in(rng, i)))
        done = done | (new_B == eos_id)
        return i + 1, mutated["cache"], out.at[:, i].set(new_B), done, next_pos_B + 1

    done = first == eos_id
    next_pos = positions_BxP[:, -1] + 1
    carry = (jnp.int32(1), mutated["cache"], out, done, next_pos)
    return jax.lax.while_loop(cond, body, carry)[2]


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, vocab_limit: int | None = None, eos_id: int = -1,
             pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (stopping after `eos_id`, which is included)."""
    if cfg.pos != "rope" and max(len(p) for p in prompts) + max_new_tokens > cfg.max_len:
        raise ValueError(f"prompt + {max_new_tokens} new tokens exceed model.max_len="
                         f"{cfg.max_len} of {cfg.pos} positions")
    tokens, segments = left_pad(prompts, pad_id)
    out = _decode(params, jnp.asarray(tokens), jnp.asarray(segments), rng, cfg=cfg,
                  max_new_tokens=max_new_tokens, temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p),
                  vocab_limit=int(vocab_limit or cfg.vocab_size), eos_id=int(eos_id),
                  pad_id=int(pad_id))
    rows = []
    for row in np.asarray(out).tolist():
        if eos_id in row:
            row = row[:row.index(eos_id) + 1]
        rows.append(row)
    return rows
