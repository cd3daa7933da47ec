"""Objectives of the encoder, ELECTRA and encoder-decoder families: a sharded step equals the
one-device step, the loss falls on learnable synthetic batches, the papers' loss weighting, the
ELECTRA replaced-token labels, the batch contract, and clear errors for mismatched configs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import get_config
from errors import ConfigError
from model.sharding import unboxed
from train import objectives, synthetic
from train import families
from train.config import validate
from train.families import OBJECTIVES
from train.setup import build
from conftest import train_run

NEW = ["mlm", "electra", "span_corruption", "prefix_lm"]
STEPS = 150


def objective_config(objective, **model):
    c = get_config()
    # a full-width ELECTRA generator learns within this test's budget; 1/4 to 1/2 in real runs
    c.model.update(family=OBJECTIVES[objective].family, vocab_size=128, d_model=32, n_heads=4,
                   n_kv_heads=2, n_layers=2, d_ff=64, max_len=64, dtype="float32",
                   generator_scale=1.0, **model)
    c.data.update(seq_len=32, batch_size=32)
    c.opt.update(lr=1e-2, warmup_steps=5)
    c.train.update(objective=objective, steps=STEPS)
    c.eval.update(sample_prompt="")
    validate(c)
    return c


def falls(records, key, by):
    first = np.mean([r[key] for r in records[:5]])
    last = np.mean([r[key] for r in records[-5:]])
    assert last < first - by, (key, first, last)


@pytest.mark.parametrize("objective", NEW)
def test_learns_and_sharded_step_matches_one_device(objective):
    config = objective_config(objective)
    if objective == "mlm":
        config.opt.grad_accum = 2               # micro-batches split the [B] pair leaves too
    config.mesh.update(data=1, fsdp=1, tensor=1)
    one, params_one, initial = train_run(config, jax.devices()[:1], STEPS)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    many, params_many, _ = train_run(config, jax.devices(), 2, initial)
    for key in one[0]:
        np.testing.assert_allclose([r[key] for r in one[:2]], [r[key] for r in many],
                                   rtol=2e-5, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params_one,
                 params_many)
    if objective == "electra":
        falls(one, "generator_loss", by=0.5)
        falls(one, "discriminator_loss", by=0.1)
    else:
        falls(one, "loss", by=0.5)


@functools.cache
def initialised(objective):
    config = objective_config(objective, scan_layers=False)
    setup = build(config, jax.devices()[:1])
    params = unboxed(setup.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                     ["params"])
    return config, setup.model, params


def test_mlm_loss_is_the_sum_of_the_two_means():
    config, model, params = initialised("mlm")
    batch = synthetic.mlm_batch(8, 32, 128, seed=3, pairs=True)
    batch["pair_weights"][:3] = 0.0            # rows without a sentence pair

    @jax.jit
    def both(params, batch):
        total, sums = objectives.mlm(model, params, batch, rng=jax.random.PRNGKey(0),
                                     train=False)
        out = model.apply({"params": params}, batch["inputs"], batch["positions"],
                          batch["segment_ids"], batch["type_ids"])
        return total, sums, out

    total, sums, out = both(params, batch)
    mlm_ce = optax.softmax_cross_entropy_with_integer_labels(out["mlm_logits"], batch["targets"])
    mlm_mean = np.sum(mlm_ce * batch["weights"]) / np.sum(batch["weights"])
    pair_ce = optax.softmax_cross_entropy_with_integer_labels(out["pair_logits"],
                                                              batch["pair_labels"])
    pair_mean = np.mean(pair_ce[3:])
    np.testing.assert_allclose(total / sums["weight"], mlm_mean + pair_mean, rtol=1e-5)
    np.testing.assert_allclose(sums["loss"] / sums["weight"], mlm_mean, rtol=1e-5)
    np.testing.assert_allclose(sums["pair_loss"] / sums["weight"], pair_mean, rtol=1e-5)


def test_electra_replaces_only_selected_tokens_and_a_correct_sample_is_original():
    config, model, params = initialised("electra")
    batch = synthetic.mlm_batch(4, 32, 128, seed=5, pairs=False)
    batch["segment_ids"][:, -4:] = 0                           # some padding
    batch["weights"][:, -4:] = 0.0
    target = 20
    batch["targets"] = np.where(batch["weights"] > 0, target, batch["targets"]).astype(np.int32)
    n_selected, n_real = batch["weights"].sum(), (batch["segment_ids"] != 0).sum()
    run = jax.jit(lambda p: objectives.electra(model, p, batch, rng=jax.random.PRNGKey(1),
                                               train=False))

    def generator_always(token):
        """Params whose generator puts all its mass on `token`."""
        bias = params["generator"]["mlm_head"]["bias"]
        return {**params, "generator": {**params["generator"], "mlm_head": {
            **params["generator"]["mlm_head"], "bias": bias.at[token].set(1e4)}}}

    total, sums = run(generator_always(target))      # samples equal the original: none replaced
    assert sums["replaced"] == 0 and sums["weight"] == n_real
    assert sums["generator_accuracy"] / sums["weight"] == pytest.approx(1.0)
    total, sums = run(generator_always(target + 1))  # every selected token replaced
    assert sums["replaced"] == n_selected
    np.testing.assert_allclose(
        total / sums["weight"], sums["generator_loss"] / sums["weight"] +
        objectives.DISCRIMINATOR_WEIGHT * sums["discriminator_loss"] / sums["weight"],
        rtol=1e-5)
    assert sums["generator_loss"] / sums["weight"] > 1e3   # mean MLM loss of a wrong generator


def test_synthetic_batches_follow_the_contract():
    config = objective_config("span_corruption")
    batch = synthetic.span_corruption_batch(4, 32, 128, seed=0)
    spans, length = synthetic.span_corruption_length(32)
    assert batch["encoder_inputs"].shape == (4, 32)
    assert batch["decoder_targets"].shape == (4, length) == batch["decoder_inputs"].shape
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["decoder_targets"][:, :-1])
    sentinels = set(range(128 - spans, 128))
    for enc, dec in zip(batch["encoder_inputs"], batch["decoder_targets"]):
        assert [t for t in enc if t in sentinels] == [t for t in dec if t in sentinels]
    assert families.decoder_length(config) == length
    for objective, keys in (("mlm", {"pair_labels", "pair_weights", "type_ids"}),
                            ("electra", {"type_ids"}), ("prefix_lm", {"decoder_weights"})):
        config.train.objective = objective
        config.model.family = OBJECTIVES[objective].family
        batch = families.synthetic_batch(config, jax.devices()[0])
        assert keys <= set(batch) and ("pair_labels" in batch) == (objective == "mlm")
        assert all(v.shape[0] == 32 for v in batch.values())
        assert batch.get("weights", batch.get("decoder_weights")).dtype == jnp.float32


@pytest.mark.parametrize("objective, family, message", [
    ("mlm", "decoder", "train.objective='mlm' trains a model.family='encoder' model, not "
                       "model.family='decoder'; set --config.model.family=encoder, or an "
                       "objective for 'decoder' models: clm"),
    ("electra", "encoder", "model.family='electra'"),
    ("span_corruption", "decoder", "model.family='encoder_decoder'"),
    ("clm", "encoder_decoder", "objective for 'encoder_decoder' models: span_corruption, "
                               "prefix_lm"),
])
def test_objective_and_family_must_match(objective, family, message):
    config = objective_config(objective)
    config.model.family = family
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(config)


def test_bad_family_configs_are_clear_errors():
    config = objective_config("mlm")
    config.eval.sample_prompt = "def "
    with pytest.raises(ConfigError, match="eval.sample_prompt is for the families that generate"):
        validate(config)
    config = objective_config("electra")
    config.model.generator_scale = 1.5
    with pytest.raises(ConfigError, match=r"model.generator_scale must be in \(0, 1\]"):
        validate(config)
    config = objective_config("prefix_lm")
    config.model.n_decoder_layers = -1
    with pytest.raises(ConfigError, match="model.n_decoder_layers must be >= 0"):
        validate(config)
