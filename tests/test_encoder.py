"""Encoder (BERT) and ELECTRA models: bidirectional, examples isolated by segments, variants,
scan == unrolled, logical names, and the generator sharing the discriminator's embeddings."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import ModelConfigError
from model import ModelConfig
from model.sharding import unboxed
from train.families import build

# Unrolled layers: an eager nn.scan recompiles on every call, which would dominate these tests.
BASE = ModelConfig.create(family="encoder", vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2,
                   n_layers=2, d_ff=48, max_len=32, dtype="float32", init_std=0.1,
                   scan_layers=False)
BERT = dict(post_norm=True, norm="layernorm", mlp="gelu", use_bias=True, pos="learned")


def tokens(b=2, t=12, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 3, 97)


@functools.cache
def forward(cfg):
    """The jitted full forward pass (one compile per input layout, not one per operation)."""
    return jax.jit(build(cfg).apply)


def init(cfg, x):
    # eager: the per-shape initialiser programs are shared with every other same-sized model
    return unboxed(build(cfg).init(jax.random.PRNGKey(0), x)["params"])


@pytest.mark.parametrize("overrides", [
    {}, BERT, {"pos": "sinusoidal", "tie_embeddings": False, "type_vocab_size": 0},
    {"n_kv_heads": 1, "mlp": "swiglu"},
])
def test_bidirectional_each_variant(overrides):
    cfg = dataclasses.replace(BASE, **overrides)
    x = tokens()
    params = init(cfg, x)
    apply = forward(cfg)
    out = apply({"params": params}, x)
    assert out["mlm_logits"].shape == (2, 12, 97) and out["mlm_logits"].dtype == jnp.float32
    assert out["pair_logits"].shape == (2, 2) and out["hidden"].shape == (2, 12, 32)
    changed = apply({"params": params}, x.at[:, 8].set(5))
    # a later token moves every earlier output, the [CLS] state the pair head reads included
    assert np.abs(out["mlm_logits"][:, :8] - changed["mlm_logits"][:, :8]).max(-1).min() > 1e-5
    assert np.abs(out["hidden"][:, 0] - changed["hidden"][:, 0]).max(-1).min() > 1e-4
    assert np.abs(out["pair_logits"] - changed["pair_logits"]).max() > 0
    if cfg.type_vocab_size:
        types = jnp.zeros_like(x).at[:, 6:].set(1)
        typed = apply({"params": params}, x, None, None, types)
        assert np.abs(typed["mlm_logits"] - out["mlm_logits"]).max() > 1e-4


@pytest.mark.parametrize("overrides", [{}, BERT])
def test_segments_isolate_packed_examples_and_padding(overrides):
    cfg = dataclasses.replace(BASE, **overrides)
    x = tokens(1, 12)
    apply = forward(cfg)
    params = init(cfg, x)
    segments = jnp.array([[1] * 5 + [2] * 5 + [0] * 2])       # two examples, then padding
    positions = jnp.array([list(range(5)) * 2 + [0, 0]])
    types = jnp.array([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0]])
    packed = apply({"params": params}, x, positions, segments, types)["mlm_logits"]
    alone = apply({"params": params}, x[:, 5:10], None, None, types[:, 5:10])["mlm_logits"]
    np.testing.assert_allclose(packed[:, 5:10], alone, atol=1e-5)
    other = x.at[:, 0].set(9).at[:, 11].set(9)                # change example 1 and the padding
    moved = apply({"params": params}, other, positions, segments, types)["mlm_logits"]
    np.testing.assert_allclose(packed[:, 5:10], moved[:, 5:10], atol=1e-6)
    assert np.abs(packed[:, 1:5] - moved[:, 1:5]).max() > 1e-5   # example 1 did see its change


def _scanned(params, n_layers, *path):
    """Unrolled params (layers_0 .. layers_{n-1}) in the scanned layout (leading layer axis)."""
    params = jax.tree.map(lambda a: a, params)
    node = params
    for key in path:
        node = node[key]
    layers = [node.pop(f"layers_{i}") for i in range(n_layers)]
    node["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return params


@pytest.mark.parametrize("family", ["encoder", "electra"])
def test_scan_matches_unrolled_layers(family):
    cfg = dataclasses.replace(BASE, family=family)
    x = tokens()
    unrolled = init(cfg, x)
    if family == "encoder":
        scanned = _scanned(unrolled, cfg.n_layers, "encoder")
    else:
        scanned = _scanned(_scanned(unrolled, cfg.n_layers, "discriminator", "encoder"),
                           cfg.n_layers, "generator", "encoder")
    a = forward(cfg)({"params": unrolled}, x)
    b = forward(dataclasses.replace(cfg, scan_layers=True))({"params": scanned}, x)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5), a, b)


@pytest.mark.parametrize("family", ["encoder", "electra"])
def test_every_param_has_logical_names(family):
    for cfg in (dataclasses.replace(BASE, family=family, scan_layers=True),
                dataclasses.replace(BASE, family=family, tie_embeddings=False, **BERT)):
        boxed = jax.eval_shape(lambda: build(cfg).init(jax.random.PRNGKey(0), tokens()))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.meta.AxisMetadata))
        assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
        for v in leaves:
            assert len(v.names) == v.value.ndim


def test_electra_generator_is_narrow_and_shares_the_embeddings():
    cfg = dataclasses.replace(BASE, family="electra", generator_scale=0.5)
    x = tokens()
    params = init(cfg, x)
    assert set(params) == {"embeddings", "generator", "discriminator"}
    assert params["generator"]["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].shape[-1] == 24
    assert params["generator"]["embed_proj"]["kernel"].shape == (32, 16)
    model = build(cfg)

    @jax.jit
    def embedding_grads(p):
        def loss(p, method):
            return jnp.sum(model.apply({"params": p}, x, method=method) ** 2)
        return [jax.grad(loss)(p, method)["embeddings"]["embed"]["embedding"]
                for method in (model.generator_logits, model.discriminator_logits)]

    # both halves read (and train) the one token embedding
    assert all(np.abs(g).max() > 0 for g in embedding_grads(params))
    out = jax.eval_shape(model.apply, {"params": params}, x)
    assert out["mlm_logits"].shape == (2, 12, 97) and out["rtd_logits"].shape == (2, 12)


def test_bad_family_settings_name_the_key():
    with pytest.raises(ModelConfigError, match="model.generator_scale must be in"):
        dataclasses.replace(BASE, family="electra", generator_scale=0.0)
    with pytest.raises(ModelConfigError, match="model.generator_scale=0.6 gives an invalid"):
        dataclasses.replace(BASE, family="electra", generator_scale=0.6, n_kv_heads=0)
    with pytest.raises(ModelConfigError, match="model.type_vocab_size must be >= 0"):
        dataclasses.replace(BASE, type_vocab_size=-1)
    with pytest.raises(ModelConfigError, match="model.family='bert'"):
        dataclasses.replace(BASE, family="bert")
