"""Issue 14's BART-style denoising, post-LN everywhere and loss weights from the config.

Denoising: each noise's statistics measured on real text (pydoc topics), a denoising run on the
stdlib corpus whose loss falls, and its sharded step equal to the one-device step on real
batches (layout, packing and exact resume are in test_data_objectives / test_data_resume).
Post-LN: a decoder and an encoder-decoder block compute norm(x + f(x)) by hand, and a post-LN
decoder trains. Loss weights: the total is the weighted sum of the logged parts."""
import collections
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from data import noise, pipeline, sentence_pairs
from data.packing import Doc
from data.tokenizer import EOS, MASK
from errors import ConfigError, LoomError
from model.attention import Attention
from model.config import ModelConfig
from model.decoder import DecoderBlock, DecoderLM, residual_std
from model.encoder_decoder import CrossDecoderBlock
from model.layers import Mlp
from model.sharding import activate, unboxed
from train import families, state as state_lib, synthetic
from train.config import validate
from train.loop import train
from train.setup import build

OFF = dict(infill_rate=0.0, permute_rate=0.0)   # every noise off; a test turns one on


def _examples(tokenizer, texts, seq_len=128, **rates):
    make = noise.DenoiseExamples(tokenizer, noise.NoiseConfig.create(**{**OFF, **rates}),
                                 seq_len, seq_len)
    out = [e for i, t in enumerate(texts) for e in make(Doc(t, 0, (0, 0, i)))]
    for e in out:   # the target is the text + EOS, read behind BOS; the input ends with EOS
        assert e["decoder_targets"][-1] == EOS and e["encoder_inputs"][-1] == EOS
        np.testing.assert_array_equal(e["decoder_inputs"][1:], e["decoder_targets"][:-1])
    return [(e["encoder_inputs"][:-1], e["decoder_targets"][:-1]) for e in out]


def _chunks(tokenizer, texts, size=127):
    for text in texts:
        ids = [tokenizer.encode_array(s) for s in sentence_pairs.sentences(text)]
        yield from noise.chunks([s for s in ids if len(s)], size)


def test_masking_and_deletion_hit_their_rates_on_real_text(tokenizer, topics):
    mask_id = tokenizer.piece_id(MASK)
    pairs = _examples(tokenizer, topics, mask_rate=0.3)
    n = sum(len(y) for _, y in pairs)
    assert n > 50_000 and all(len(x) == len(y) for x, y in pairs)
    masked = sum(int(np.sum(x == mask_id)) for x, _ in pairs)
    assert masked / n == pytest.approx(0.3, abs=0.005)
    for x, y in pairs:                      # every other token is the original
        np.testing.assert_array_equal(x[x != mask_id], y[x != mask_id])

    pairs = _examples(tokenizer, topics, delete_rate=0.2)
    kept = sum(len(x) for x, _ in pairs)
    assert 1 - kept / n == pytest.approx(0.2, abs=0.005)
    for x, y in pairs[:200]:                # what is left is the text in order, minus tokens
        it = iter(y.tolist())
        assert all(t in it for t in x.tolist())


def test_text_infilling_spans_are_poisson_and_one_mask_each(tokenizer, topics):
    lam, rate, mask_id = 3.0, 0.3, tokenizer.piece_id(MASK)
    rng = np.random.default_rng(0)
    lengths, hidden, total = [], 0, 0
    for chunk in _chunks(tokenizer, topics):
        ids = np.concatenate(chunk)
        starts, span_lengths = noise.span_plan(len(ids), rate, lam, rng)
        out = noise.infill(ids, starts, span_lengths, mask_id)
        # by hand: each span -> one [MASK] (an empty one inserts it), the rest unchanged
        expected, cursor = [], 0
        for start, length in zip(starts, span_lengths):
            assert start >= cursor + (1 if cursor else 0) or start == cursor == 0  # apart
            expected += ids[cursor:start].tolist() + [mask_id]
            cursor = start + length
        expected += ids[cursor:].tolist()
        assert out.tolist() == expected
        assert int(np.sum(out == mask_id)) == len(starts)
        lengths += span_lengths.tolist()
        hidden, total = hidden + span_lengths.sum(), total + len(ids)
    lengths = np.array(lengths)
    assert len(lengths) > 10_000
    assert hidden / total == pytest.approx(rate, abs=0.005)
    assert lengths.mean() == pytest.approx(lam, rel=0.06)       # (the last span is trimmed)
    assert np.mean(lengths == 0) == pytest.approx(math.exp(-lam), abs=0.01)   # inserted masks
    # through the example builder: the same share of the text hidden, one mask per span
    pairs = _examples(tokenizer, topics[:30], infill_rate=rate, infill_lambda=lam)
    n = sum(len(y) for _, y in pairs)
    masks = sum(int(np.sum(x == mask_id)) for x, _ in pairs)
    kept = sum(len(x) for x, _ in pairs) - masks
    assert (n - kept) / n == pytest.approx(rate, abs=0.01)
    assert masks / n == pytest.approx(rate / lam, rel=0.1)


def test_sentence_permutation_and_rotation(tokenizer, topics):
    rng = np.random.default_rng(1)
    cfg = noise.NoiseConfig.create(**{**OFF, "permute_rate": 1.0})
    moved = multi = 0
    for chunk in list(_chunks(tokenizer, topics[:30])):
        seed = int(rng.integers(1 << 30))
        out = noise.noised(chunk, cfg, 4, np.random.default_rng(seed))
        # the same sentences, in the order the permutation drew
        again = noise.permute_sentences(chunk, 1.0, np.random.default_rng(seed))
        assert collections.Counter(map(bytes, again)) == collections.Counter(map(bytes, chunk))
        np.testing.assert_array_equal(out, np.concatenate(again))
        if len(chunk) > 2:
            multi += 1
            moved += not np.array_equal(out, np.concatenate(chunk))
    assert multi > 100 and moved / multi > 0.8     # (identical orders: repeated lines)
    # the sentences are the text's own (sentence_pairs.sentences), none lost or cut needlessly
    text = topics[5]
    whole = [tokenizer.encode_array(s) for s in sentence_pairs.sentences(text)]
    pieces = [s for c in _chunks(tokenizer, [text]) for s in c]
    np.testing.assert_array_equal(np.concatenate(pieces), np.concatenate(whole))
    assert len(pieces) == len([s for s in whole if len(s)])      # no sentence here is > 127

    pairs = _examples(tokenizer, topics[:30], rotate_rate=1.0)
    for x, y in pairs:
        if len(y) > 1:
            offsets = [k for k in range(1, len(y)) if np.array_equal(x, np.roll(y, -k))]
            assert offsets, "the input is a rotation of the text"
    half = _examples(tokenizer, topics[:30], rotate_rate=0.5)
    rotated = np.mean([not np.array_equal(x, y) for x, y in half if len(set(y.tolist())) > 1])
    assert rotated == pytest.approx(0.5, abs=0.1)


def test_noise_keys_are_checked(config):
    config.model.family = "encoder_decoder"
    config.train.objective = "denoise"
    for key, value, message in [
            ("mask_rate", 1.5, r"data.noise.mask_rate must be in \[0, 1\]"),
            ("infill_lambda", 0.0, "data.noise.infill_lambda must be positive"),
            ("delete_rate", 0.8, "infill_rate \\+ mask_rate \\+ delete_rate = 1.1")]:
        bad = config.copy_and_resolve_references()
        bad.data.noise[key] = value
        with pytest.raises(LoomError, match=message):
            validate(bad)
    bad = config.copy_and_resolve_references()
    bad.data.noise.update(infill_rate=0.0, permute_rate=0.0)
    with pytest.raises(LoomError, match="only copies its input"):
        validate(bad)
    bad = config.copy_and_resolve_references()
    bad.data.target_len = bad.data.seq_len + 1
    with pytest.raises(LoomError, match="exceeds data.seq_len"):
        validate(bad)


def _denoise(config, **model):
    config.model.update(family="encoder_decoder", pos="learned", n_decoder_layers=1,
                        scan_layers=False, norm="layernorm", mlp="gelu", use_bias=True, **model)
    config.train.update(objective="denoise")
    return config


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_denoising_with_post_ln_trains_on_real_text(config, tmp_path):
    config = _denoise(config, post_norm=True)
    config.data.target_len = 24               # decoder rows shorter than the encoder's 32
    config.train.update(steps=24, log_every=4)
    config.eval.update(every=24, steps=2)
    config.ckpt.update(every=24)
    result = train(config, tmp_path, progress=False)
    logged = _records(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in logged if "loss" in r and "split" not in r and r["step"] > 0]
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [r for r in logged if r.get("split") == "eval"]
    assert evals and math.isfinite(evals[-1]["loss"]) and 0 <= evals[-1]["accuracy"] <= 1
    assert math.isfinite(result["loss"])
    # MFU counts the decoder's parameters on the rows' 24 decoder tokens, not on 32
    start = next(r for r in logged if "flops_per_token" in r)
    model = ModelConfig.from_mapping(json.loads((tmp_path / "config.json").read_text())["model"])
    assert start["flops_per_token"] == pytest.approx(
        families.flops_per_token(model, start["params"], 32, 24))
    assert start["flops_per_token"] < families.flops_per_token(model, start["params"], 32, 32)


def test_denoising_sharded_step_matches_one_device(config, tokenizer):
    config = _denoise(config)
    config.model.vocab_size = tokenizer.vocab_size

    def run(devices, mesh, initial):
        config.mesh.update(**mesh)
        setup = build(config, devices)
        with activate(setup.mesh, setup.rules):
            state = (state_lib.init(setup.model, setup.model_cfg, setup.tx,
                                    setup.state_shardings, 0) if initial is None else
                     jax.device_put(initial, setup.state_shardings))
            initial = jax.device_get(state)
            batches = pipeline.train_batches(config.data, tokenizer, setup.batch_sharding,
                                             objective="denoise")
            step, out = setup.train_step(), []
            for _ in range(2):
                state, metrics = step(state, next(batches))
                out.append(jax.device_get(metrics))
        return out, jax.device_get(state.params), initial

    one, params_one, initial = run(jax.devices()[:1], dict(data=1, fsdp=1, tensor=1), None)
    many, params_many, _ = run(jax.devices(), dict(data=2, fsdp=2, tensor=2), initial)
    for key in one[0]:
        np.testing.assert_allclose([r[key] for r in one], [r[key] for r in many], rtol=2e-5,
                                   atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params_one,
                 params_many)


def _layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"][None, None] + p["bias"][None, None]


POST = ModelConfig.create(vocab_size=64, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                          mlp="gelu", norm="layernorm", norm_eps=1e-5, pos="learned",
                          use_bias=True, dtype="float32", post_norm=True)


def test_post_ln_blocks_compute_norm_of_residual_sum():
    cfg, std = POST, residual_std(POST)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 32))
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    segments = jnp.ones((2, 8), jnp.int32)
    encoded = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 32))
    enc_segments = jnp.ones((2, 6), jnp.int32)
    ln = lambda h, p: _layer_norm(h, p, cfg.norm_eps)   # noqa: E731
    mlp = lambda h, p: Mlp(cfg, std).apply({"params": p}, h)   # noqa: E731

    block = DecoderBlock(cfg)
    p = unboxed(block.init(jax.random.PRNGKey(2), x, positions, segments)["params"])
    y = ln(x + Attention(cfg, std, causal=True).apply({"params": p["attn"]}, x, positions,
                                                      segments), p["attn_norm"])
    y = ln(y + mlp(y, p["mlp"]), p["mlp_norm"])
    out, _ = block.apply({"params": p}, x, positions, segments)
    np.testing.assert_allclose(out, y, atol=1e-5)
    pre, _ = DecoderBlock(dataclasses.replace(POST, post_norm=False)).apply(
        {"params": p}, x, positions, segments)
    assert not np.allclose(pre, out, atol=1e-3)

    block = CrossDecoderBlock(cfg, std)
    args = (x, positions, segments, encoded, enc_segments)
    p = unboxed(block.init(jax.random.PRNGKey(3), *args)["params"])
    y = ln(x + Attention(cfg, std, causal=True).apply({"params": p["attn"]}, x, positions,
                                                      segments), p["attn_norm"])
    y = ln(y + Attention(cfg, std, cross=True).apply({"params": p["cross_attn"]}, y, positions,
                                                     segments, encoded, enc_segments),
           p["cross_norm"])
    y = ln(y + mlp(y, p["mlp"]), p["mlp_norm"])
    out, _ = block.apply({"params": p}, *args)
    np.testing.assert_allclose(out, y, atol=1e-5)
    # the stacks end normed by their last block: no final norm
    params = DecoderLM(cfg).init(jax.random.PRNGKey(4), jnp.zeros((1, 8), jnp.int32))["params"]
    assert "final_norm" not in params
    seq2seq = dataclasses.replace(POST, family="encoder_decoder")
    params = families.build(seq2seq).init(jax.random.PRNGKey(5),
                                          *families.init_inputs(seq2seq))["params"]
    assert "final_norm" not in params["decoder"] and "final_norm" not in params["encoder"]


def test_post_ln_decoder_trains_on_real_text(config, tmp_path):
    config.model.update(post_norm=True, norm="layernorm", mlp="gelu", use_bias=True,
                        pos="learned", scan_layers=False)
    config.train.update(steps=16, log_every=4)
    config.eval.update(every=16, steps=1)
    config.ckpt.update(every=16)
    train(config, tmp_path, progress=False)
    losses = [r["loss"] for r in _records(tmp_path / "metrics.jsonl")
              if "loss" in r and "split" not in r and r["step"] > 0]
    assert losses[-1] < losses[0] - 0.5 and losses[0] < math.log(512) + 0.5, losses


def _weighted(objective, **train_keys):
    c = get_config()
    c.model.update(family=families.OBJECTIVES[objective].family, vocab_size=128, d_model=32,
                   n_heads=4, n_layers=1, d_ff=64, max_len=64, dtype="float32",
                   generator_scale=0.5, scan_layers=False)
    c.data.update(seq_len=32, batch_size=8)
    c.train.update(objective=objective, **train_keys)
    c.eval.update(sample_prompt="")
    validate(c)
    setup = build(c, jax.devices()[:1])
    params = unboxed(setup.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                     ["params"])
    return c, setup, params


def test_loss_weights_come_from_the_config():
    z = 1e-3
    config, setup, params = _weighted("mlm", pair_weight=0.3)
    batch = synthetic.mlm_batch(8, 32, 128, seed=3, pairs=True)
    total, sums = families.loss(config)(setup.model, params, batch, rng=jax.random.PRNGKey(0),
                                        train=False, z_loss=z)
    assert sums["pair_loss"] > 0
    np.testing.assert_allclose(total, sums["loss"] + z * sums["z_loss"] + 0.3 * sums["pair_loss"],
                               rtol=1e-5)

    config, setup, params = _weighted("electra", discriminator_weight=7.0)
    batch = synthetic.mlm_batch(8, 32, 128, seed=4, pairs=False)
    total, sums = families.loss(config)(setup.model, params, batch, rng=jax.random.PRNGKey(0),
                                        train=False, z_loss=z)
    np.testing.assert_allclose(
        total, sums["generator_loss"] + z * sums["z_loss"] + 7.0 * sums["discriminator_loss"],
        rtol=1e-5)
    # the eval step the loop and train.eval run reads the same weight
    logged = jax.device_get(setup.eval_step()(params, batch))
    np.testing.assert_allclose(logged["loss"], logged["generator_loss"] +
                               7.0 * logged["discriminator_loss"], rtol=1e-5)
    with pytest.raises(ConfigError, match="train.discriminator_weight must be >= 0"):
        _weighted("electra", discriminator_weight=-1.0)
