"""Mesh construction, logical->mesh rules, and sharded == unsharded numerics on 8 CPU devices."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from errors import MeshError
from model.sharding import activate, make_mesh, mesh_shape
from train import state as state_lib
from train.families import synthetic_batch
from train.setup import build


def test_mesh_fill_and_errors():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 1, 2)
    assert mesh_shape({"data": 2, "sequence": -1, "tensor": 2}, 8) == (2, 1, 2, 2)
    assert make_mesh({"data": 2, "fsdp": 2, "tensor": 2}).shape == {
        "data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    with pytest.raises(MeshError, match="needs 12 devices but 8 are present"):
        mesh_shape({"data": 3, "fsdp": 2, "tensor": 2}, 8)
    with pytest.raises(MeshError, match="only one mesh axis may be -1"):
        mesh_shape({"data": -1, "fsdp": -1, "tensor": 2}, 8)
    with pytest.raises(MeshError, match="not divisible"):
        mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def _config(config, data, fsdp, tensor):
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    config.model.vocab_size = 512
    return config


# The golden layout of every family's parameters is pinned in test_golden_sharding.py.


def test_indivisible_dimension_is_replicated(config):
    config.model.n_kv_heads = 1   # one KV head cannot be split over tensor=2
    setup = build(_config(config, 2, 2, 2))
    assert setup.state_shardings.params["layers"]["attn"]["key"]["kernel"].spec == \
        P(None, "fsdp", None, None)


def _two_steps(config, devices):
    setup = build(config, devices)
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)
        step = setup.train_step()
        losses = []
        for seed in range(2):
            state, metrics = step(state, synthetic_batch(config, setup.batch_sharding, seed))
            losses.append(float(metrics["loss"]))
    return losses, state


def _block_shape(shape, spec, mesh):
    """One device's block of an array of `shape` laid out by `spec`: each dimension divided by
    the sizes of the mesh axes its entry names."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    sizes = [math.prod(mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,)) if a)
             for e in entries]
    assert all(dim % size == 0 for dim, size in zip(shape, sizes)), (shape, spec)
    return tuple(dim // size for dim, size in zip(shape, sizes))


def test_sharded_step_matches_single_device(config):
    one, state_one = _two_steps(_config(config, 1, 1, 1), jax.devices()[:1])
    many, state_many = _two_steps(_config(config, 2, 2, 2), jax.devices())
    np.testing.assert_allclose(one, many, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 jax.device_get(state_one.params), jax.device_get(state_many.params))

    # the state really is spread over the devices: every device holds the block its spec names
    mesh = state_many.params["embed"]["embedding"].sharding.mesh
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    held = total = 0
    for x in jax.tree.leaves(state_many):
        block = _block_shape(x.shape, x.sharding.spec, mesh)
        assert len(x.addressable_shards) == 8
        assert all(s.data.shape == block for s in x.addressable_shards), (x.shape, block)
        # as many distinct blocks as the named axes split it into, each on its own devices
        assert len({str(s.index) for s in x.addressable_shards}) == \
            math.prod(x.shape) // math.prod(block)
        held += math.prod(block) * x.dtype.itemsize
        total += x.size * x.dtype.itemsize
    assert held < total / 3      # fsdp x tensor = 4: each device holds about a quarter

    def blocks(x):
        return {s.data.shape for s in x.addressable_shards}
    params, mu = state_many.params, state_many.opt_state[1][0].mu
    assert blocks(params["embed"]["embedding"]) == {(256, 16)}                 # V/tensor, D/fsdp
    assert blocks(params["layers"]["mlp"]["wi"]["kernel"]) == {(2, 16, 2, 32)}  # F/tensor
    assert blocks(mu["layers"]["mlp"]["wi"]["kernel"]) == {(2, 16, 2, 32)}      # moments too
    assert blocks(params["layers"]["attn"]["query"]["kernel"]) == {(2, 16, 2, 8)}  # 4 heads
    assert blocks(params["layers"]["attn"]["key"]["kernel"]) == {(2, 16, 1, 8)}    # 2 KV heads
    assert blocks(params["layers"]["attn"]["out"]["kernel"]) == {(2, 2, 8, 16)}
    assert blocks(params["final_norm"]["scale"]) == {(32,)}                    # replicated
    assert state_one.params["embed"]["embedding"].addressable_shards[0].data.shape == (512, 32)


def test_gradient_accumulation_matches_full_batch(config):
    config.opt.clip_norm = 0.0
    full, s_full = _two_steps(_config(config, -1, 1, 1), jax.devices())    # 8 rows on 8 devices
    config.opt.grad_accum = 2
    acc, s_acc = _two_steps(_config(config, 4, 1, 1), jax.devices()[:4])   # 2 x 4 rows on 4
    np.testing.assert_allclose(full, acc, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 jax.device_get(s_full.params), jax.device_get(s_acc.params))


def _packed_batch(config, sharding, seed):
    """clm rows packed with three documents each (positions restart, segment ids 1..3) and a
    padded tail (segment 0, weight 0): the masks sequence parallelism must keep."""
    from train.synthetic import clm_batch
    rows, length = config.data.batch_size, config.data.seq_len
    batch = {k: np.array(v) for k, v in clm_batch(rows, length, config.model.vocab_size,
                                                     seed).items()}
    bounds = [0, 11, 24, 29, length]
    segments, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        segments[:, a:b] = i + 1 if b < length else 0
        positions[:, a:b] = np.arange(b - a)
    batch.update(segment_ids=segments, positions=positions,
                 weights=(segments > 0).astype(np.float32))
    return jax.device_put(batch, sharding)


def test_sequence_parallel_step_matches_single_device(config):
    """data x sequence x tensor = 2 x 2 x 2: activations split along the length, K/V gathered
    for attention; causal and packed-segment masks give the one-device numbers."""
    def two_steps(devices):
        setup = build(config, devices)
        with activate(setup.mesh, setup.rules):
            state = state_lib.init(setup.model, setup.model_cfg, setup.tx,
                                   setup.state_shardings, 0)
            step = setup.train_step()
            losses = []
            for seed in range(2):
                batch = _packed_batch(config, setup.batch_sharding, seed)
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
            logits = jax.jit(lambda p, b: setup.model.apply(
                {"params": p}, b["inputs"], b["positions"], b["segment_ids"]))(state.params, batch)
        return losses, state, logits

    config.model.vocab_size = 512
    config.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
    one, state_one, logits_one = two_steps(jax.devices()[:1])
    config.mesh.update(data=2, fsdp=1, sequence=2, tensor=2)
    many, state_many, logits_many = two_steps(jax.devices())
    # the activations really are split along the length over the sequence axis
    assert logits_many.sharding.spec[1] == "sequence"
    assert {s.data.shape for s in logits_many.addressable_shards} == {(4, 16, 256)}
    np.testing.assert_allclose(one, many, rtol=1e-5)
    np.testing.assert_allclose(logits_one, logits_many, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 jax.device_get(state_one.params), jax.device_get(state_many.params))
    # a length the sequence axis does not split is refused before anything compiles
    from train.config import validate
    config.data.seq_len = 31
    with pytest.raises(MeshError, match="data.seq_len=31 does not split over mesh.sequence=2"):
        validate(config)
