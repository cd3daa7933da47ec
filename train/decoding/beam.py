"""Beam search over any stepper (train/decoding/steppers.py) in one jitted `lax.while_loop`.

The B prompts' W beams each are rows b*W + w of one stepper state, so they share one KV cache.
Every step extends each live beam by every token and keeps the 2W best extensions (so W stay
live even if W of them end in a stop token): those ending in a stop token join the finished
beams, the W best others become the live beams, and the cache rows follow each beam's origin.

Scores are log p(new tokens | prompt) / length ** length_penalty, with length the number of new
tokens including the stop token (Hugging Face's convention): length_penalty 0 ranks by total
log-probability, which favours short outputs; 1 by the mean per token; above 1 favours long
ones. The search ends after max_new_tokens, or once for every prompt no live beam can score
above its W-th finished one; live beams then count as finished (scored at their length).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from train.decoding.sampling import is_stop, mask_vocab
from train.decoding.steppers import Prompt, Stepper


@flax.struct.dataclass
class Beams:
    tokens_BxWxN: jax.Array     # new tokens; pad after a stop token and after the current step
    scores_BxW: jax.Array       # live: summed log-probability; finished: length-penalised score


def _best(tokens_BxKxN: jax.Array, scores_BxK: jax.Array, width: int) -> Beams:
    scores_BxW, pick_BxW = lax.top_k(scores_BxK, width)
    return Beams(jnp.take_along_axis(tokens_BxKxN, pick_BxW[..., None], axis=1), scores_BxW)


def _penalised(logp: jax.Array, length, length_penalty: float) -> jax.Array:
    return logp / jnp.asarray(length, jnp.float32) ** length_penalty


@functools.partial(jax.jit, static_argnames=("stepper", "width", "max_new_tokens",
                                             "length_penalty", "stop_ids", "vocab_limit",
                                             "pad_id"))
def search(stepper: Stepper, params: Any, prompt: Prompt, *, width: int, max_new_tokens: int,
           length_penalty: float, stop_ids: Sequence[int], vocab_limit: int,
           pad_id: int) -> tuple[jax.Array, jax.Array]:
    """tokens_BxWxN and scores_BxW of each prompt's W best sequences, best first."""
    logits_BxV, state = stepper.start(params, prompt, max_new_tokens)
    batch, n = logits_BxV.shape[0], max_new_tokens
    state = stepper.reorder(state, jnp.repeat(jnp.arange(batch), width))
    logits_RxV = jnp.repeat(logits_BxV, width, axis=0)
    empty_BxWxN = jnp.full((batch, width, n), pad_id, jnp.int32)
    # only beam 0 starts live, so the first step does not pick the same token W times
    live = Beams(empty_BxWxN, jnp.full((batch, width), -jnp.inf).at[:, 0].set(0.0))
    finished = Beams(empty_BxWxN, jnp.full((batch, width), -jnp.inf))

    def extend(live: Beams, finished: Beams, logits_RxV: jax.Array, t: jax.Array):
        """Beams after choosing token t; the state rows to keep and their next input."""
        logp_RxV = jax.nn.log_softmax(mask_vocab(logits_RxV, vocab_limit), axis=-1)
        vocab = logp_RxV.shape[-1]
        total_BxWV = (live.scores_BxW[..., None] + logp_RxV.reshape(batch, width, vocab)
                      ).reshape(batch, width * vocab)
        logp_Bx2W, flat_Bx2W = lax.top_k(total_BxWV, 2 * width)
        origin_Bx2W, token_Bx2W = flat_Bx2W // vocab, (flat_Bx2W % vocab).astype(jnp.int32)
        tokens_Bx2WxN = jnp.take_along_axis(live.tokens_BxWxN, origin_Bx2W[..., None], axis=1)
        tokens_Bx2WxN = tokens_Bx2WxN.at[:, :, t].set(token_Bx2W)
        stop_Bx2W = is_stop(token_Bx2W, stop_ids)
        done_Bx2W = jnp.where(stop_Bx2W, _penalised(logp_Bx2W, t + 1, length_penalty), -jnp.inf)
        finished = _best(jnp.concatenate([finished.tokens_BxWxN, tokens_Bx2WxN], axis=1),
                         jnp.concatenate([finished.scores_BxW, done_Bx2W], axis=1), width)
        live_logp_BxW, pick_BxW = lax.top_k(jnp.where(stop_Bx2W, -jnp.inf, logp_Bx2W), width)
        live = Beams(jnp.take_along_axis(tokens_Bx2WxN, pick_BxW[..., None], axis=1),
                     live_logp_BxW)
        origin_BxW = jnp.take_along_axis(origin_Bx2W, pick_BxW, axis=1)
        rows_R = (jnp.arange(batch)[:, None] * width + origin_BxW).reshape(-1)
        next_R = jnp.take_along_axis(token_Bx2W, pick_BxW, axis=1).reshape(-1)
        return live, finished, rows_R, next_R

    def settled(live: Beams, finished: Beams, t: jax.Array) -> jax.Array:
        """No live beam can still beat the W-th finished one (log-probs only fall; the penalty
        divides by at most max_new_tokens ** p when p > 0, at least (t + 1) ** p otherwise)."""
        longest = n if length_penalty > 0 else t + 1
        best_possible_B = _penalised(live.scores_BxW[:, 0], longest, length_penalty)
        return jnp.all(finished.scores_BxW[:, -1] > best_possible_B)

    def cond(carry):
        t, _, live, finished, _ = carry
        return (t < n) & ~settled(live, finished, t)

    def body(carry):
        t, state, live, finished, next_R = carry
        logits_RxV, state = stepper.step(params, state, next_R)
        live, finished, rows_R, next_R = extend(live, finished, logits_RxV, t)
        return t + 1, stepper.reorder(state, rows_R), live, finished, next_R

    live, finished, rows_R, next_R = extend(live, finished, logits_RxV, jnp.int32(0))
    carry = (jnp.int32(1), stepper.reorder(state, rows_R), live, finished, next_R)
    t, _, live, finished, _ = lax.while_loop(cond, body, carry)
    final = _best(jnp.concatenate([finished.tokens_BxWxN, live.tokens_BxWxN], axis=1),
                  jnp.concatenate([finished.scores_BxW,
                                   _penalised(live.scores_BxW, t, length_penalty)], axis=1),
                  width)
    return final.tokens_BxWxN, final.scores_BxW
