"""Decoding: beam search, sampling filters, stop tokens, sliding window, sharded generation."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import DEFAULT_RULES
from errors import ConfigError
from model import ModelConfig
from model.sharding import activate, logical_shardings, make_mesh, rules_from_config, unboxed
from train.decoding import beam
from train.decoding.generate import stepper_for
from train.decoding.generate import generate, left_pad
from train.decoding.options import Options
from train.decoding.sampling import filter_logits
from train.decoding.steppers import CachedDecoder, Recompute
from train.families import build

# init_std 1 makes a random model's predictions varied and confident, so searches differ
CFG = ModelConfig.create(vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=48,
                  max_len=32, dtype="float32", init_std=1.0)
PROMPTS = [[2, 11, 12, 13, 14, 15], [2, 40, 41], [2, 7], [2, 30, 31, 32]]


def init(cfg, seed=0):
    """Random parameters of `cfg` (normal, std cfg.init_std), without compiling initialisers."""
    shapes = jax.eval_shape(lambda: build(cfg).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, cfg.init_std, s.shape), s.dtype),
                        unboxed(shapes))


@pytest.fixture(scope="module")
def params():
    return init(CFG)


@pytest.fixture(scope="module")
def plain(params):
    """20 greedy tokens for each of PROMPTS, without stop tokens."""
    return greedy(CFG, params, PROMPTS, 20)


def greedy(cfg, params, prompts, n, **kw):
    return generate(cfg, params, prompts, max_new_tokens=n, stop_ids=(), **kw)


def log_probs(cfg, params, prompt, candidates):
    """log p(candidate | prompt) for each candidate, by one full forward pass without a cache."""
    width = max(len(c) for c in candidates)
    seqs = jnp.array([prompt + list(c) + [0] * (width - len(c)) for c in candidates])
    logp = jax.nn.log_softmax(build(cfg).apply({"params": params}, seqs)[:, :-1], -1)
    picked = jnp.take_along_axis(logp[:, len(prompt) - 1:], seqs[:, len(prompt):, None], -1)
    mask = np.arange(width)[None] < np.array([len(c) for c in candidates])[:, None]
    return np.asarray(jnp.sum(picked[..., 0] * mask, axis=1))


def prompt_arrays(prompts):
    tokens, segments = left_pad(prompts)
    return {"tokens": jnp.asarray(tokens), "segments": jnp.asarray(segments)}


@pytest.mark.parametrize("overrides", [{}, {"pos": "learned", "scan_layers": False}])
def test_beam_search_with_the_cache_equals_beam_search_by_recomputation(overrides, plain):
    cfg = dataclasses.replace(CFG, **overrides)
    params = init(cfg)
    kw = dict(width=3, max_new_tokens=7, length_penalty=1.0, stop_ids=(5, 9), vocab_limit=61,
              pad_id=0)
    cached = beam.search(CachedDecoder(cfg), params, prompt_arrays(PROMPTS), **kw)
    recomputed = beam.search(Recompute(cfg), params, prompt_arrays(PROMPTS), **kw)
    np.testing.assert_array_equal(cached[0], recomputed[0])
    np.testing.assert_allclose(cached[1], recomputed[1], rtol=1e-5)
    if not overrides:  # the search really branched: its best is not the greedy path everywhere
        assert any(list(b) != g[:7] for b, g in zip(np.asarray(cached[0][:, 0]), plain))


def test_wide_beam_finds_the_best_sequence_found_by_enumeration():
    length_penalty, stop_ids = 1.0, (4,)
    cfg = dataclasses.replace(CFG, vocab_size=5)
    params, prompt, n = init(cfg), [2, 1, 3], 3
    tokens, scores = beam.search(CachedDecoder(cfg), params, prompt_arrays([prompt]), width=25,
                                 max_new_tokens=n, length_penalty=length_penalty,
                                 stop_ids=stop_ids, vocab_limit=5, pad_id=0)
    # every sequence the search could return: n tokens, or fewer ending in a stop token
    candidates = [list(s) for s in itertools.product(range(5), repeat=n)]
    candidates = {tuple(next((s[:i + 1] for i, t in enumerate(s) if t in stop_ids), s))
                  for s in candidates}
    candidates = sorted(candidates)
    logps = log_probs(cfg, params, prompt, candidates)
    scored = sorted(((lp / len(s) ** length_penalty, s) for lp, s in zip(logps, candidates)),
                    reverse=True)
    best_score, best = scored[0]
    assert scored[1][0] < best_score - 1e-4          # a unique answer
    got = [int(t) for t in tokens[0, 0, :len(best)]]
    assert got == list(best) and float(scores[0, 0]) == pytest.approx(best_score, abs=1e-4)
    assert float(scores[0, 1]) == pytest.approx(scored[1][0], abs=1e-4)


def test_beam_width_one_is_greedy_with_stop_tokens(params, plain):
    plain = [row[:8] for row in plain]
    stops = (plain[0][3], plain[1][5])                # tokens greedy emits mid-way
    want = generate(CFG, params, PROMPTS, max_new_tokens=8, stop_ids=stops)
    got = generate(CFG, params, PROMPTS, max_new_tokens=8, stop_ids=stops,
                   options=Options("beam", beam_width=1, length_penalty=0.0))
    assert got == want
    # each row ends at its first stop token, whichever of the set it is
    for row, full in zip(want, plain):
        first = next((i for i, t in enumerate(full) if t in stops), None)
        assert row == (full if first is None else full[:first + 1])
    assert len(want[0]) == 4 and want[0][-1] == stops[0]


def test_top_k_one_is_greedy_and_seeds_reproduce(params, plain):
    sample = Options("sample", temperature=0.8)
    for seed in (0, 1):
        assert greedy(CFG, params, PROMPTS, 20, rng=jax.random.PRNGKey(seed),
                      options=dataclasses.replace(sample, top_k=1)) == plain
    first, again, other = (greedy(CFG, params, PROMPTS, 20, rng=jax.random.PRNGKey(seed),
                                  options=sample) for seed in (3, 3, 4))
    assert first == again and first != other and first != plain


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])          # sorted: 0.5, 0.3, 0.15, 0.05
    logits = jnp.log(jnp.array([probs]))

    def kept(p, **kw):
        out = filter_logits(logits, temperature=1.0, top_k=0, top_p=p, vocab_limit=4, **kw)
        return set(np.flatnonzero(np.asarray(out[0]) > -1e30))

    assert kept(0.4) == {1}                             # 0.5 alone reaches 0.4
    assert kept(0.75) == {1, 3}                         # 0.5 + 0.3
    assert kept(0.9) == {1, 3, 2}
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    # temperature sharpens before the nucleus is taken: at T=0.25, 0.5 alone is over 0.75
    sharp = filter_logits(logits, temperature=0.25, top_k=0, top_p=0.75, vocab_limit=4)
    assert set(np.flatnonzero(np.asarray(sharp[0]) > -1e30)) == {1}
    limited = filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0, vocab_limit=2)
    assert np.asarray(limited[0])[2:].max() < -1e30     # ids past the tokenizer are never drawn


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_sliding_window_matches_its_definition_past_the_context(pos):
    cfg = dataclasses.replace(CFG, pos=pos, max_len=16)
    params, model = init(cfg), build(cfg)
    # right padding to one width keeps the forward pass a single compilation
    forward = jax.jit(lambda x: model.apply({"params": params}, x))
    window, keep, n = 16, 6, 24
    prompts = [list(range(2, 22)), list(range(30, 50))]   # 20 tokens: longer than the window
    got = greedy(cfg, params, prompts, n, window=window, keep=keep)
    for prompt, row in zip(prompts, got):
        # the definition: predict from the tokens since `start`; when the cache would overflow,
        # start again from the last `keep` tokens (positions from 0, as a new sequence)
        seq, start = list(prompt), len(prompt) - window
        for _ in range(n):
            if len(seq) - start > window:
                start = len(seq) - keep
            context = seq[start:]
            logits = forward(jnp.array([context + [0] * (window - len(context))]))
            seq.append(int(jnp.argmax(logits[0, len(context) - 1])))
        assert row == seq[len(prompt):]


def test_sliding_window_changes_nothing_until_the_cache_is_full(params, plain):
    # without a window argument, 6 + 20 tokens fit max_len=32 and nothing slides
    slid = greedy(CFG, params, PROMPTS, 20, window=12, keep=4)
    # the longest prompt (6 tokens) fills 12 slots after 6 new tokens; then rows may differ
    assert [row[:7] for row in slid] == [row[:7] for row in plain]
    assert slid != plain and all(len(row) == 20 for row in slid)


def test_generation_on_a_sharded_model_equals_unsharded(params, plain):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = rules_from_config(DEFAULT_RULES)
    boxed = jax.eval_shape(lambda: build(CFG).init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 8), jnp.int32))["params"])
    sharded = jax.device_put(params, logical_shardings(boxed, mesh, rules))
    assert sharded["embed"]["embedding"].sharding.spec != jax.sharding.PartitionSpec()
    runs = [(PROMPTS, Options("sample", temperature=1.0, top_p=0.9)),
            (PROMPTS[:2], Options("beam", beam_width=2))]
    want = [generate(CFG, params, p, max_new_tokens=6, options=o) for p, o in runs]
    with activate(mesh, rules):
        got = [generate(CFG, sharded, p, max_new_tokens=6, options=o) for p, o in runs]
        # and one row, which does not split over data * fsdp = 4
        got_single = greedy(CFG, sharded, PROMPTS[:1], 20)
    assert got == want and got_single == plain[:1]



def test_generation_with_sequence_parallelism_equals_unsharded(params, plain):
    """Decoding on a data x sequence x tensor = 2 x 2 x 2 mesh: the prompt (prefill) and each
    new token's activations fall on the sequence axis, and the tokens are the same."""
    mesh = make_mesh({"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2})
    rules = rules_from_config(DEFAULT_RULES)
    boxed = jax.eval_shape(lambda: build(CFG).init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 8), jnp.int32))["params"])
    sharded = jax.device_put(params, logical_shardings(boxed, mesh, rules))
    with activate(mesh, rules):
        got = greedy(CFG, sharded, PROMPTS, 20)
        recomputed = greedy(CFG, sharded, PROMPTS, 4, use_cache=False)
    assert got == plain and recomputed == [row[:4] for row in plain]

def test_bad_options_are_named(params):
    with pytest.raises(ConfigError, match="temperature > 0"):
        Options("sample", temperature=0.0)
    with pytest.raises(ConfigError, match="top_p must be in"):
        Options("sample", top_p=0.0)
    with pytest.raises(ConfigError, match="strategy 'topk'"):
        Options("topk")
    learned = dataclasses.replace(CFG, pos="learned")
    with pytest.raises(ConfigError, match="exceeds model.max_len=32"):
        generate(learned, params, PROMPTS, max_new_tokens=4, window=64)
    with pytest.raises(ConfigError, match="needs the KV cache"):
        generate(CFG, params, PROMPTS, max_new_tokens=40, use_cache=False)


# encoder-decoder: the encoder reads each prompt (+ EOS), the decoder writes from BOS
T5 = dataclasses.replace(CFG, family="encoder_decoder", n_decoder_layers=2, pos="learned",
                         norm="layernorm", mlp="gelu")
SOURCES = [[11, 12, 13, 14, 15, 3], [40, 41, 3], [7, 3], [30, 31, 32, 3]]


def init_t5(cfg, seed=0):
    shapes = jax.eval_shape(lambda: build(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32)
    )["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, cfg.init_std, s.shape), s.dtype),
                        unboxed(shapes))


def t5_greedy_by_full_forward(cfg, params, source, n):
    """Greedy output for one unpadded source by running the whole model on a fixed-width decoder
    input (one compilation; it is causal, so the slots after the prefix cannot matter)."""
    forward = jax.jit(build(cfg).apply)
    out = np.full((1, n + 1), 2, np.int32)
    for i in range(n):
        logits = forward({"params": params}, jnp.array([source]), jnp.asarray(out))
        out[0, i + 1] = int(jnp.argmax(logits[0, i, :cfg.vocab_size]))
    return out[0, 1:].tolist()


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": False, "pos": "rope"}])
def test_encoder_decoder_decodes_from_the_encoder_output(overrides):
    cfg = dataclasses.replace(T5, **overrides)
    params = init_t5(cfg)
    cached = greedy(cfg, params, SOURCES, 6)
    assert cached == greedy(cfg, params, SOURCES, 6, use_cache=False)
    assert len({tuple(row) for row in cached}) > 1         # the outputs depend on the input
    if overrides:
        return
    # left padding of the batch changes nothing: a padded row equals its unpadded decoding
    assert cached[2] == t5_greedy_by_full_forward(cfg, params, SOURCES[2], 6)
    kw = dict(width=3, max_new_tokens=5, length_penalty=1.0, stop_ids=(5, 9), vocab_limit=61,
              pad_id=0)
    beams = beam.search(stepper_for(cfg), params, prompt_arrays(SOURCES), **kw)
    by_recompute = beam.search(stepper_for(cfg, use_cache=False), params,
                               prompt_arrays(SOURCES), **kw)
    np.testing.assert_array_equal(beams[0], by_recompute[0])
    width_one = generate(cfg, params, SOURCES, max_new_tokens=6, stop_ids=(),
                         options=Options("beam", beam_width=1))
    assert width_one == cached


def test_an_encoder_does_not_generate():
    cfg = dataclasses.replace(CFG, family="encoder", pos="learned")
    with pytest.raises(ConfigError, match="does not generate text"):
        generate(cfg, {}, PROMPTS, max_new_tokens=4)
