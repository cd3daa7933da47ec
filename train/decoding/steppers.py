"""What the search loops need from a model (a *stepper*), and the decoder-only family's steppers.

The loops in generate.py (greedy, sampling) and beam.py (beam search) see a model only through
three functions, so a new family plugs in by providing them:

    start(params, prompt, max_new_tokens) -> (logits_RxV, state)   read the prompt
    step(params, state, token_R) -> (logits_RxV, state)             append one token to each row
    reorder(state, rows_R) -> state                                 row i becomes old row rows_R[i]

`logits_RxV` predict each row's next token. `state` is a pytree the stepper owns; loops only carry
it through `lax.while_loop` and reorder it (beam search turns B prompts into B*W beams with
`reorder(state, repeat(arange(B), W))` and follows each beam's origin every step). Steppers are
frozen dataclasses, so they are static arguments of `jax.jit`. `prompt` is a dict of [B, ...]
arrays; for the decoder-only family `tokens` and `segments` (left-padded, see `left_pad`).

The encoder-decoder family (`CachedEncoderDecoder`, `RecomputeEncoderDecoder`) reads the same
`tokens`/`segments` as its *encoder* input (the text ids followed by EOS, as in training; padding
anywhere is masked); `start` runs the encoder once and the decoder on [BOS], and each step feeds
the decoder one more token. The cached stepper keeps the decoder's self-attention keys/values and
the projected encoder output (cross-attention keys/values) in its cache and gathers both in
`reorder`. An encoder input longer than the window keeps its last `window` tokens.

Sliding window (`CachedDecoder`): the cache has `window` slots (default model.max_len). The first
context is the prompt's last `window` tokens; when the cache is full, the last `keep` tokens
(default window // 2) are prefilled again into an empty cache with positions restarting at 0, and
decoding goes on. Every token is thus predicted from between `keep` and `window` preceding
tokens, at positions below `window`: exact for learned and sinusoidal positions (which cannot
exceed max_len) and for RoPE. Rows of a batch share the cache's fill level, so they slide at the
same steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from data.tokenizer import BOS
from model import encoder_decoder
from model.config import ModelConfig
from model.decoder import DecoderLM
from model.encoder_decoder import EncoderDecoderLM
from model.layers import prompted_segments
from train.soft_prompt import split as split_prompt

Prompt = Mapping[str, jax.Array]


class Stepper(Protocol):
    def start(self, params: Any, prompt: Prompt, max_new_tokens: int
              ) -> tuple[jax.Array, Any]: ...

    def step(self, params: Any, state: Any, token_R: jax.Array) -> tuple[jax.Array, Any]: ...

    def reorder(self, state: Any, rows_R: jax.Array) -> Any: ...


def positions_of(segments_RxT: jax.Array) -> jax.Array:
    """Each token's position among the real (segment != 0) tokens of its row, from 0."""
    return jnp.maximum(jnp.cumsum(segments_RxT, axis=1) - 1, 0).astype(jnp.int32)


@flax.struct.dataclass
class History:
    """Every token of each row so far: the left-padded prompt, then the new tokens."""
    tokens_RxL: jax.Array
    segments_RxL: jax.Array     # 1 real, 0 padding (or not yet written)
    length: jax.Array           # () tokens written, the same for every row

    @classmethod
    def of(cls, prompt: Prompt, max_new_tokens: int) -> "History":
        tokens_RxP, segments_RxP = prompt["tokens"], prompt["segments"]
        pad = ((0, 0), (0, max_new_tokens))
        return cls(jnp.pad(tokens_RxP.astype(jnp.int32), pad),
                   jnp.pad(segments_RxP.astype(jnp.int32), pad), jnp.int32(tokens_RxP.shape[1]))

    def append(self, token_R: jax.Array) -> "History":
        at = (0, self.length)
        return History(lax.dynamic_update_slice(self.tokens_RxL, token_R[:, None], at),
                       lax.dynamic_update_slice(self.segments_RxL,
                                                jnp.ones_like(token_R)[:, None], at),
                       self.length + 1)

    def last(self, n: int) -> tuple[jax.Array, jax.Array]:
        """tokens_Rxn and segments_Rxn of the `n` most recent slots."""
        rows = self.tokens_RxL.shape[0]
        at = (0, self.length - n)
        return (lax.dynamic_slice(self.tokens_RxL, at, (rows, n)),
                lax.dynamic_slice(self.segments_RxL, at, (rows, n)))

    def take(self, rows_R: jax.Array) -> "History":
        return History(self.tokens_RxL[rows_R], self.segments_RxL[rows_R], self.length)


@flax.struct.dataclass
class CacheState:
    history: History
    cache: Any                  # the model's "cache" collection (KV per layer)
    filled: jax.Array           # () cache slots in use
    next_pos_R: jax.Array       # position of each row's next token


# cache leaves that hold one entry per row (the rest, cache_index, is shared by all rows)
_ROW_LEAVES = ("cached_key", "cached_value", "cached_segment", "cross_key", "cross_value",
               "cross_segment", "cached_position")


def _take_rows(cfg: ModelConfig, cache: Any, rows_R: jax.Array) -> Any:
    """The cache of rows `rows_R` (with scanned layers each leaf of the "layers" stack has a
    leading layers axis; a stack's own leaves, T5's key positions, have none)."""
    def take(path, leaf):
        name = getattr(path[-1], "key", None)
        scanned = cfg.scan_layers and any(getattr(k, "key", None) == "layers" for k in path)
        return jnp.take(leaf, rows_R, axis=1 if scanned else 0) if name in _ROW_LEAVES else leaf

    return jax.tree_util.tree_map_with_path(take, cache)


@dataclasses.dataclass(frozen=True)
class CachedDecoder:
    """Decoder-only LM with a KV cache of `window` slots (0 = model.max_len) that slides by
    prefilling the last `keep` tokens (0 = window // 2) again when it is full."""
    cfg: ModelConfig
    window: int = 0
    keep: int = 0

    @property
    def window_size(self) -> int:
        return self.window or self.cfg.max_len

    @property
    def keep_size(self) -> int:
        return self.keep or max(self.window_size // 2, 1)

    def _prefill(self, params, tokens_RxT, segments_RxT, slots: int):
        """Logits after the last token and a fresh `slots`-slot cache holding all T tokens
        (after a prompt-tuned run's P soft-prompt vectors, which take P more slots and
        positions)."""
        decoder = DecoderLM(self.cfg, decode=True)
        params, soft_PxD = split_prompt(params)
        extra = 0 if soft_PxD is None else soft_PxD.shape[0]
        rows = tokens_RxT.shape[0]
        shapes = jax.eval_shape(lambda: decoder.init(
            jax.random.PRNGKey(0), jnp.zeros((rows, slots + extra), jnp.int32)))["cache"]
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        positions_RxT = positions_of(segments_RxT)
        logits_RxTxV, mutated = decoder.apply({"params": params, "cache": cache}, tokens_RxT,
                                              positions_RxT, segments_RxT, mutable=["cache"],
                                              prompt_PxD=soft_PxD)
        return logits_RxTxV[:, -1], mutated["cache"], positions_RxT[:, -1] + 1 + extra

    def start(self, params: Any, prompt: Prompt, max_new_tokens: int):
        history = History.of(prompt, max_new_tokens)
        context = min(prompt["tokens"].shape[1], self.window_size)
        tokens_RxC, segments_RxC = history.last(context)
        slots = min(history.tokens_RxL.shape[1], self.window_size)
        logits_RxV, cache, next_pos_R = self._prefill(params, tokens_RxC, segments_RxC, slots)
        return logits_RxV, CacheState(history, cache, jnp.int32(context), next_pos_R)

    def step(self, params: Any, state: CacheState, token_R: jax.Array):
        history = state.history.append(token_R)
        total = history.tokens_RxL.shape[1]

        def extend():
            decoder = DecoderLM(self.cfg, decode=True)
            logits_Rx1xV, mutated = decoder.apply(
                {"params": split_prompt(params)[0], "cache": state.cache}, token_R[:, None],
                state.next_pos_R[:, None], jnp.ones_like(token_R)[:, None], mutable=["cache"])
            return logits_Rx1xV[:, -1], mutated["cache"], state.filled + 1, state.next_pos_R + 1

        def slide():
            tokens_RxK, segments_RxK = history.last(self.keep_size)
            logits_RxV, cache, next_pos_R = self._prefill(params, tokens_RxK, segments_RxK,
                                                          self.window_size)
            return logits_RxV, cache, jnp.int32(self.keep_size), next_pos_R

        if total <= self.window_size:      # the cache can never fill: no slide to compile
            logits_RxV, cache, filled, next_pos_R = extend()
        else:
            logits_RxV, cache, filled, next_pos_R = lax.cond(
                state.filled == self.window_size, slide, extend)
        return logits_RxV, CacheState(history, cache, filled, next_pos_R)

    def reorder(self, state: CacheState, rows_R: jax.Array) -> CacheState:
        return state.replace(history=state.history.take(rows_R),
                             cache=_take_rows(self.cfg, state.cache, rows_R),
                             next_pos_R=state.next_pos_R[rows_R])


@dataclasses.dataclass(frozen=True)
class Recompute:
    """Decoder-only LM without a cache: every step runs the model over the whole history
    (fixed width, so one compilation). The reference the cache is tested against, and the
    "no KV cache" figure of the benchmark. No sliding window."""
    cfg: ModelConfig

    def _logits_at(self, params, history: History, index: jax.Array) -> jax.Array:
        params, soft_PxD = split_prompt(params)
        logits_RxLxV = DecoderLM(self.cfg).apply(
            {"params": params}, history.tokens_RxL, positions_of(history.segments_RxL),
            history.segments_RxL, prompt_PxD=soft_PxD)
        return lax.dynamic_index_in_dim(logits_RxLxV, index, axis=1, keepdims=False)

    def start(self, params: Any, prompt: Prompt, max_new_tokens: int):
        history = History.of(prompt, max_new_tokens)
        return self._logits_at(params, history, history.length - 1), history

    def step(self, params: Any, state: History, token_R: jax.Array):
        history = state.append(token_R)
        return self._logits_at(params, history, history.length - 1), history

    def reorder(self, state: History, rows_R: jax.Array) -> History:
        return state.take(rows_R)


def _encode(cfg: ModelConfig, params: Any, prompt: Prompt, window: int
            ) -> tuple[jax.Array, jax.Array]:
    """The encoder output of the prompt's last `window` tokens, and their segment ids (a
    prompt-tuned run's encoder reads its soft prompt first and both come with its P vectors in
    front, which the decoder attends to as in training)."""
    tokens_RxT, segments_RxT = prompt["tokens"], prompt["segments"]
    width = min(tokens_RxT.shape[1], window or cfg.max_len)
    tokens_RxT, segments_RxT = tokens_RxT[:, -width:], segments_RxT[:, -width:].astype(jnp.int32)
    model = EncoderDecoderLM(cfg)
    params, soft_PxD = split_prompt(params)
    encoded_RxTxD = model.apply({"params": params}, tokens_RxT, positions_of(segments_RxT),
                                segments_RxT, prompt_PxD=soft_PxD, keep_prompt=True,
                                method=model.encode)
    if soft_PxD is not None:
        segments_RxT = prompted_segments(soft_PxD.shape[0], segments_RxT, segments_RxT.shape)
    return encoded_RxTxD, segments_RxT


@flax.struct.dataclass
class Seq2SeqCache:
    cache: Any                  # decoder self-attention and cross-attention keys/values
    next_pos: jax.Array         # () decoder position of the next input token


@dataclasses.dataclass(frozen=True)
class CachedEncoderDecoder:
    """Encoder-decoder LM: the encoder runs once; the decoder one token per step, with a cache of
    `max_new_tokens` self-attention slots and the projected encoder output."""
    cfg: ModelConfig
    window: int = 0

    def _decoder(self, params, cache, token_Rx1, encoded, encoder_segments, position):
        model = EncoderDecoderLM(self.cfg, decode=True)
        logits_Rx1xV, mutated = model.apply(
            {"params": split_prompt(params)[0], "cache": cache}, token_Rx1, encoded, encoder_segments,
            jnp.full_like(token_Rx1, position), method=model.decoder_logits, mutable=["cache"])
        return logits_Rx1xV[:, -1], mutated["cache"]

    def start(self, params: Any, prompt: Prompt, max_new_tokens: int):
        encoded_RxTxD, segments_RxT = _encode(self.cfg, params, prompt, self.window)
        rows, width = segments_RxT.shape
        cache = encoder_decoder.init_cache(self.cfg, rows, max_new_tokens, width)
        bos_Rx1 = jnp.full((rows, 1), BOS, jnp.int32)
        logits_RxV, cache = self._decoder(params, cache, bos_Rx1, encoded_RxTxD, segments_RxT, 0)
        return logits_RxV, Seq2SeqCache(cache, jnp.int32(1))

    def step(self, params: Any, state: Seq2SeqCache, token_R: jax.Array):
        logits_RxV, cache = self._decoder(params, state.cache, token_R[:, None].astype(jnp.int32),
                                          None, None, state.next_pos)
        return logits_RxV, Seq2SeqCache(cache, state.next_pos + 1)

    def reorder(self, state: Seq2SeqCache, rows_R: jax.Array) -> Seq2SeqCache:
        return state.replace(cache=_take_rows(self.cfg, state.cache, rows_R))


@flax.struct.dataclass
class Seq2SeqHistory:
    encoded_RxTxD: jax.Array
    encoder_segments_RxT: jax.Array
    decoder: History            # [BOS] and the new tokens


@dataclasses.dataclass(frozen=True)
class RecomputeEncoderDecoder:
    """Encoder-decoder LM without a decoder cache: every step runs the decoder over all of its
    tokens so far (fixed width, one compilation); the reference for `CachedEncoderDecoder`."""
    cfg: ModelConfig
    window: int = 0

    def _logits(self, params, state: Seq2SeqHistory) -> jax.Array:
        model = EncoderDecoderLM(self.cfg)
        history = state.decoder
        logits_RxSxV = model.apply(
            {"params": split_prompt(params)[0]}, history.tokens_RxL, state.encoded_RxTxD,
            state.encoder_segments_RxT, positions_of(history.segments_RxL),
            history.segments_RxL, method=model.decoder_logits)
        return lax.dynamic_index_in_dim(logits_RxSxV, history.length - 1, 1, keepdims=False)

    def start(self, params: Any, prompt: Prompt, max_new_tokens: int):
        encoded_RxTxD, segments_RxT = _encode(self.cfg, params, prompt, self.window)
        bos_Rx1 = jnp.full((segments_RxT.shape[0], 1), BOS, jnp.int32)
        history = History.of({"tokens": bos_Rx1, "segments": jnp.ones_like(bos_Rx1)},
                             max_new_tokens - 1)
        state = Seq2SeqHistory(encoded_RxTxD, segments_RxT, history)
        return self._logits(params, state), state

    def step(self, params: Any, state: Seq2SeqHistory, token_R: jax.Array):
        state = state.replace(decoder=state.decoder.append(token_R))
        return self._logits(params, state), state

    def reorder(self, state: Seq2SeqHistory, rows_R: jax.Array) -> Seq2SeqHistory:
        return Seq2SeqHistory(state.encoded_RxTxD[rows_R], state.encoder_segments_RxT[rows_R],
                              state.decoder.take(rows_R))


def decoder_stepper(cfg: ModelConfig, use_cache: bool = True, window: int = 0,
                    keep: int = 0) -> Stepper:
    """The decoder-only family's stepper: KV cache with a sliding window, or recomputation."""
    return CachedDecoder(cfg, window, keep) if use_cache else Recompute(cfg)


def encoder_decoder_stepper(cfg: ModelConfig, use_cache: bool = True, window: int = 0,
                            keep: int = 0) -> Stepper:
    """The encoder-decoder family's stepper (`keep` does not apply: the encoder input is read
    once, its last `window` tokens)."""
    del keep
    return CachedEncoderDecoder(cfg, window) if use_cache else RecomputeEncoderDecoder(cfg, window)
