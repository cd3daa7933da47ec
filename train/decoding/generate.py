"""Text generation: greedy, sampling and beam search over any family's stepper, with a KV cache.

`generate()` is the Python API for batches: prompts of different lengths are left-padded (each
row's positions count only its real tokens, so padding changes nothing), and decoding runs in
one jitted `lax.while_loop` over the family's stepper (train/decoding/steppers.py: KV cache,
sliding window for prompts longer than the model's context). A row stops at any of `stop_ids`
(kept in the output) or after `max_new_tokens`.
"""
from __future__ import annotations

import codecs
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.tokenizer import BOS, EOS, PAD, WORD_START, Tokenizer
from errors import ConfigError, DataError
from model.config import ModelConfig
from model.sharding import activate
from train import families
from train.decoding import beam
from train.decoding.options import Options
from train.decoding.sampling import choose, is_stop
from train.decoding.steppers import Prompt, Stepper
from train.restore import restore


def stepper_for(cfg: ModelConfig, *, use_cache: bool = True, window: int = 0,
                keep: int = 0) -> Stepper:
    """The stepper of `cfg.family` (cached or recomputing); a family that writes no text is a
    ConfigError."""
    family = families.family(cfg)
    if family.stepper is None:
        raise ConfigError(f"model.family={cfg.family!r} does not generate text (an encoder "
                          "predicts masked tokens in place); use train.eval to score it")
    return family.stepper(cfg, use_cache=use_cache, window=window, keep=keep)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """tokens_BxP and segments_BxP (1 real, 0 padding), prompts aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (start with BOS)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        segments[i, width - len(p):] = 1
    return tokens, segments


@functools.partial(jax.jit, static_argnames=("stepper", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "vocab_limit", "stop_ids",
                                             "pad_id"))
def sample_loop(stepper: Stepper, params: Any, prompt: Prompt, rng: jax.Array, *,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                vocab_limit: int, stop_ids: Sequence[int], pad_id: int) -> jax.Array:
    """new_BxN: greedy (temperature 0) or sampled tokens, `pad_id` after a row's stop token."""
    pick = functools.partial(choose, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_limit=vocab_limit)
    logits_BxV, state = stepper.start(params, prompt, max_new_tokens)
    first_B = pick(logits_BxV, jax.random.fold_in(rng, 0))
    out_BxN = jnp.full((first_B.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)

    def cond(carry):
        i, _, _, done_B = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, state, out_BxN, done_B = carry
        logits_BxV, state = stepper.step(params, state, out_BxN[:, i - 1])
        new_B = jnp.where(done_B, pad_id, pick(logits_BxV, jax.random.fold_in(rng, i)))
        return i + 1, state, out_BxN.at[:, i].set(new_B), done_B | is_stop(new_B, stop_ids)

    carry = (jnp.int32(1), state, out_BxN, is_stop(first_B, stop_ids))
    return jax.lax.while_loop(cond, body, carry)[2]


def decode(stepper: Stepper, params: Any, prompt: Prompt, options: Options, *,
           max_new_tokens: int, rng: jax.Array, vocab_limit: int,
           stop_ids: Sequence[int] = (EOS,), pad_id: int = PAD) -> np.ndarray:
    """new_BxN tokens for a batch of prompt arrays (any model family's stepper)."""
    common = dict(max_new_tokens=max_new_tokens, vocab_limit=vocab_limit,
                  stop_ids=tuple(int(s) for s in stop_ids), pad_id=pad_id)
    if options.strategy == "beam":
        tokens_BxWxN, _ = beam.search(stepper, params, prompt, width=options.beam_width,
                                      length_penalty=float(options.length_penalty), **common)
        return np.asarray(tokens_BxWxN[:, 0])
    greedy = options.strategy == "greedy"
    return np.asarray(sample_loop(
        stepper, params, prompt, rng, temperature=0.0 if greedy else float(options.temperature),
        top_k=int(options.top_k), top_p=float(options.top_p), **common))


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, options: Options = Options(), rng: jax.Array | None = None,
             stop_ids: Sequence[int] = (EOS,), vocab_limit: int | None = None,
             pad_id: int = PAD, window: int = 0, keep: int = 0,
             use_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt, up to and including the first stop id.

    `window`/`keep` set the sliding context window (0 = model.max_len / half of it); without
    the cache (`use_cache=False`, every step recomputes the whole sequence) prompt and new
    tokens must fit in the window. Call inside `model.sharding.activate(mesh, rules)` when
    `params` are sharded.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    size = window or cfg.max_len
    if not cfg.unbounded_positions and size > cfg.max_len:
        raise ConfigError(f"window {size} exceeds model.max_len={cfg.max_len}, the most "
                          f"{cfg.pos} positions can encode")
    if not 0 <= keep <= size:
        raise ConfigError(f"keep must be in [1, window={size}] (0 = half the window), got {keep}")
    tokens, segments = left_pad(prompts, pad_id)
    if families.family(cfg).prompting == "encode":
        if not cfg.unbounded_positions and max_new_tokens > cfg.max_len:
            raise ConfigError(f"max_new_tokens={max_new_tokens} exceeds model.max_len="
                              f"{cfg.max_len}, the most decoder positions the model encodes")
    elif not use_cache and tokens.shape[1] + max_new_tokens > size:
        raise ConfigError(f"prompt + {max_new_tokens} new tokens exceed the {size}-token window; "
                          "the sliding window needs the KV cache")
    stepper = stepper_for(cfg, use_cache=use_cache, window=window, keep=keep)
    prompt = {"tokens": jnp.asarray(tokens), "segments": jnp.asarray(segments)}
    out = decode(stepper, params, prompt, options, max_new_tokens=max_new_tokens,
                 rng=jax.random.PRNGKey(0) if rng is None else rng,
                 vocab_limit=int(vocab_limit or cfg.vocab_size), stop_ids=stop_ids,
                 pad_id=pad_id)
    return [_until_stop(row, stop_ids) for row in out.tolist()]


def _until_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[:i + 1]
    return row


def stop_token(tokenizer: Tokenizer, text: str) -> int:
    """The id of a stop piece given as text: backslash escapes work (\\n) and spaces stand for
    the leading-space marker (" return" is the piece "\u2581return")."""
    piece = codecs.decode(text, "unicode_escape").replace(" ", WORD_START)
    try:
        return tokenizer.piece_id(piece)
    except DataError:
        raise ConfigError(f"--stop {text!r} is not a piece of the vocabulary; stop tokens are "
                          "single pieces, e.g. '\\n' or ' return'") from None


def generate_text(cfg: ModelConfig, params: Any, tokenizer: Tokenizer, prompts: Sequence[str],
                  *, stop_ids: Sequence[int] = (EOS,), **kwargs) -> list[str]:
    """The continuation of each prompt text (without its stop token); `kwargs` as `generate`.
    A decoder-only model continues [BOS] + the prompt; an encoder-decoder model reads the prompt
    + [EOS] in its encoder (as in training) and writes its output from [BOS]."""
    prompting = families.family(cfg).prompting
    if prompting is None:
        stepper_for(cfg)    # the error of a family that writes no text
    if prompting == "encode":
        ids = [tokenizer.encode(p) + [EOS] for p in prompts]
        new = generate(cfg, params, ids, stop_ids=stop_ids, vocab_limit=tokenizer.vocab_size,
                       **kwargs)
        return [tokenizer.decode(row[:-1] if row and row[-1] in stop_ids else row)
                for row in new]
    ids = [[BOS] + tokenizer.encode(p) for p in prompts]
    new = generate(cfg, params, ids, stop_ids=stop_ids, vocab_limit=tokenizer.vocab_size,
                   **kwargs)
    texts = []
    for prompt_ids, new_ids in zip(ids, new):
        if new_ids and new_ids[-1] in stop_ids:
            new_ids = new_ids[:-1]
        # decode with the prompt: a continuation's first piece may carry the space between them
        texts.append(tokenizer.decode(prompt_ids + new_ids)[len(tokenizer.decode(prompt_ids)):])
    return texts


def shown(cfg: ModelConfig, prompt: str, text: str) -> str:
    """A prompt with its generated text: a decoder continues the prompt; an encoder-decoder
    writes an output for it, shown after an arrow."""
    return f"{prompt} -> {text}" if families.family(cfg).prompting == "encode" else prompt + text


def generate_run(workdir: str | Path, step: str | int, prompts: Sequence[str], *,
                 options: Options, max_new_tokens: int, config_args: Sequence[str] = (),
                 seed: int = 0, stops: Sequence[str] = (), window: int = 0, keep: int = 0,
                 use_cache: bool = True) -> list[str]:
    """What `python -m train.generate` prints: each prompt with the text a restored run writes
    for it (`shown`). `stops` are extra stop pieces as text (see `stop_token`)."""
    run = restore(workdir, step, config_args=config_args)
    stop_ids = [EOS] + [stop_token(run.tokenizer, s) for s in stops]
    with activate(run.setup.mesh, run.setup.rules):
        texts = generate_text(run.setup.model_cfg, run.params, run.tokenizer, prompts,
                              stop_ids=stop_ids, max_new_tokens=max_new_tokens, options=options,
                              rng=jax.random.PRNGKey(seed), window=window, keep=keep,
                              use_cache=use_cache)
    return [shown(run.setup.model_cfg, p, t) for p, t in zip(prompts, texts)]
