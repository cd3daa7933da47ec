"""Encoder-decoder model: causal decoder, cross-attention over the whole (unpadded) encoder input,
packed examples kept apart, cached decoding == recomputation, scan == unrolled, logical names."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig
from model.encoder_decoder import init_cache
from model.sharding import unboxed
from train import families
from train.families import build

# Unrolled layers: an eager nn.scan recompiles on every call, which would dominate these tests.
BASE = ModelConfig.create(family="encoder_decoder", vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2,
                   n_layers=2, n_decoder_layers=1, d_ff=48, max_len=32, dtype="float32",
                   init_std=0.1, scan_layers=False)
VARIANT = dataclasses.replace(BASE, pos="learned", tie_embeddings=False, norm="layernorm",
                              mlp="gelu", use_bias=True, n_decoder_layers=2)


def tokens(b=2, t=10, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 3, 97)


@functools.cache
def forward(cfg):
    """The jitted full forward pass (one compile per input layout, not one per operation)."""
    return jax.jit(build(cfg).apply)


@functools.cache
def params_of(cfg):
    # eager: the per-shape initialiser programs are shared with every other same-sized model
    return unboxed(build(cfg).init(jax.random.PRNGKey(0), *families.init_inputs(cfg))["params"])


@pytest.mark.parametrize("cfg", [BASE, VARIANT], ids=["base", "variant"])
def test_decoder_is_causal_and_reads_the_whole_encoder_input(cfg):
    enc, dec = tokens(2, 10, 1), tokens(2, 8, 2)
    apply, params = forward(cfg), params_of(cfg)
    logits = apply({"params": params}, enc, dec)
    assert logits.shape == (2, 8, 97) and logits.dtype == jnp.float32
    later = apply({"params": params}, enc, dec.at[:, 5].set(7))
    np.testing.assert_allclose(logits[:, :5], later[:, :5], atol=1e-6)   # the past is untouched
    assert np.abs(logits[:, 5:] - later[:, 5:]).max(-1).min() > 1e-4   # the future moves
    last_input = apply({"params": params}, enc.at[:, -1].set(7), dec)
    # every decoder position, the first included, attends to the last encoder token
    assert np.abs(logits - last_input).max(-1).min() > 1e-5


def test_encoder_padding_and_packed_examples_are_invisible():
    apply, params = forward(BASE), params_of(BASE)
    enc, dec = tokens(1, 10, 1), tokens(1, 8, 2)
    # row: encoder example 1 (4 tokens), example 2 (4 tokens), 2 padding; decoder 1 (3), 2 (5)
    enc_seg = jnp.array([[1] * 4 + [2] * 4 + [0] * 2])
    enc_pos = jnp.array([[0, 1, 2, 3] * 2 + [0, 0]])
    dec_seg = jnp.array([[1] * 3 + [2] * 5])
    dec_pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]])
    packed = apply({"params": params}, enc, dec, enc_pos, enc_seg, dec_pos, dec_seg)
    alone = apply({"params": params}, enc[:, 4:8], dec[:, 3:])
    np.testing.assert_allclose(packed[:, 3:], alone, atol=1e-5)
    other = enc.at[:, 0].set(9).at[:, 9].set(9)          # example 1 and padding change
    moved = apply({"params": params}, other, dec, enc_pos, enc_seg, dec_pos, dec_seg)
    np.testing.assert_allclose(packed[:, 3:], moved[:, 3:], atol=1e-6)
    assert np.abs(packed[:, :3] - moved[:, :3]).max() > 1e-5


def greedy_cached(cfg, params, enc_BxT, enc_segments_BxT, steps, start=2):
    """Greedy decoding with the cache inside one jitted fori_loop: encode once, then the decoder
    alone one token at a time (the first step fills the cross-attention cache)."""
    model = build(cfg, decode=True)
    batch = enc_BxT.shape[0]

    @jax.jit
    def run(params, enc_BxT, enc_segments_BxT):
        encoded = model.apply({"params": params}, enc_BxT, None, enc_segments_BxT,
                              method=model.encode)
        cache = init_cache(cfg, batch, steps, enc_BxT.shape[1])
        first = jnp.full((batch, 1), start, jnp.int32)
        logits, vars_ = model.apply({"params": params, "cache": cache}, first, encoded,
                                    enc_segments_BxT, jnp.zeros((batch, 1), jnp.int32),
                                    method=model.decoder_logits, mutable=["cache"])
        out = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(jnp.argmax(logits[:, -1], -1))

        def body(i, carry):
            cache, out = carry
            previous_Bx1 = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, 1)
            logits, vars_ = model.apply({"params": params, "cache": cache}, previous_Bx1, None,
                                        None, jnp.full((batch, 1), i, jnp.int32),
                                        method=model.decoder_logits, mutable=["cache"])
            return vars_["cache"], out.at[:, i].set(jnp.argmax(logits[:, -1], -1))

        return jax.lax.fori_loop(1, steps, body, (vars_["cache"], out))[1]

    return np.asarray(run(params, enc_BxT, enc_segments_BxT))


@pytest.mark.parametrize("cfg", [BASE, VARIANT], ids=["base", "variant"])
def test_cached_decoding_equals_full_recomputation(cfg):
    params, apply = params_of(cfg), forward(cfg)
    enc = tokens(2, 9, 3)
    enc_segments = jnp.array([[1] * 9, [1] * 6 + [0] * 3])   # row 2: a shorter, padded input
    cached = greedy_cached(cfg, params, enc, enc_segments, steps=5)
    # greedy by re-running encoder and decoder on the whole prefix; the decoder input has a
    # fixed length (one compile), and the slots after the prefix cannot matter: it is causal
    seq = jnp.full((2, 6), 2, jnp.int32)
    for i in range(5):
        logits = apply({"params": params}, enc, seq, None, enc_segments)
        seq = seq.at[:, i + 1].set(jnp.argmax(logits[:, i], -1))
    np.testing.assert_array_equal(cached, np.asarray(seq[:, 1:]))


def test_cross_attention_without_an_encoder_output_is_refused():
    model, params = build(BASE), params_of(BASE)
    with pytest.raises(ValueError, match="cross-attention needs kv_BxSxD"):
        model.apply({"params": params}, tokens(), None, method=model.decoder_logits)


def test_scan_matches_unrolled_layers():
    params = params_of(BASE)
    scanned = jax.tree.map(lambda a: a, params)
    for side, n in (("encoder", BASE.n_layers), ("decoder", BASE.decoder_layers)):
        layers = [scanned[side].pop(f"layers_{i}") for i in range(n)]
        scanned[side]["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    enc, dec = tokens(2, 10, 1), tokens(2, 8, 2)
    np.testing.assert_allclose(
        forward(BASE)({"params": params}, enc, dec),
        forward(dataclasses.replace(BASE, scan_layers=True))({"params": scanned}, enc, dec),
        atol=1e-5)


def test_every_param_has_logical_names():
    for cfg in (dataclasses.replace(BASE, scan_layers=True), VARIANT):
        boxed = jax.eval_shape(lambda: build(cfg).init(
            jax.random.PRNGKey(0), *families.init_inputs(cfg)))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.meta.AxisMetadata))
        assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
        for v in leaves:
            assert len(v.names) == v.value.ndim
    assert "lm_head" in boxed and "table" in boxed["pos"]          # untied, learned positions
    assert len([k for k in boxed["decoder"] if k.startswith("layers_")]) == 2


def test_flops_count_decoder_tokens_separately():
    cfg = dataclasses.replace(BASE, scan_layers=True)
    n = sum(x.size for x in jax.tree.leaves(params_of(BASE)))
    short, long = (families.flops_per_token(cfg, n, 16, s) for s in (4, 8))
    dec_params = sum(x.size for x in jax.tree.leaves(params_of(BASE)["decoder"]))
    # four more decoder tokens per 16 encoder tokens: their matmuls, output projection and
    # attention (self over 4..8 keys, cross over 16) cost more than the decoder's 6N share
    assert long - short > 6 * (dec_params + 97 * 32) * 4 / 16
    assert short > 6 * (n - 97 * 32 - dec_params)
