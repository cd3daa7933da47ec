"""Mesh construction, logical->mesh rules, and sharded == unsharded numerics on 8 CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model.sharding import make_mesh, mesh_shape
from errors import MeshError
from train.families import synthetic_batch
from train.setup import build
from train import state as state_lib


def test_mesh_fill_and_errors():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert make_mesh({"data": 2, "fsdp": 2, "tensor": 2}).shape == {"data": 2, "fsdp": 2,
                                                                    "tensor": 2}
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


# Golden layout on a data=2, fsdp=2, tensor=2 mesh with the default rules: a change here is a
# change of how every run is laid out, and should be deliberate.
GOLDEN = {
    "['embed']['embedding']": P("tensor", "fsdp"),
    "['final_norm']['scale']": P(None),
    "['layers']['attn']['query']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['key']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['value']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['out']['kernel']": P(None, "tensor", None, "fsdp"),
    "['layers']['attn_norm']['scale']": P(None, None),
    "['layers']['mlp']['wi']['kernel']": P(None, "fsdp", None, "tensor"),
    "['layers']['mlp']['wo']['kernel']": P(None, "tensor", "fsdp"),
    "['layers']['mlp_norm']['scale']": P(None, None),
}


def test_parameter_shardings_follow_the_rules(config):
    setup = build(_config(config, 2, 2, 2))
    specs = {jax.tree_util.keystr(path): sh.spec for path, sh in
             jax.tree_util.tree_flatten_with_path(setup.state_shardings.params)[0]}
    assert specs == GOLDEN
    # Adam moments are laid out like their parameters
    mu = setup.state_shardings.opt_state[1][0].mu
    assert mu["layers"]["mlp"]["wi"]["kernel"].spec == GOLDEN["['layers']['mlp']['wi']['kernel']"]


def test_indivisible_dimension_is_replicated(config):
    config.model.n_kv_heads = 1   # one KV head cannot be split over tensor=2
    setup = build(_config(config, 2, 2, 2))
    assert setup.state_shardings.params["layers"]["attn"]["key"]["kernel"].spec == \
        P(None, "fsdp", None, None)


def _two_steps(config, devices):
    setup = build(config, devices)
    from model.sharding import activate
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)
        step = setup.train_step()
        losses = []
        for seed in range(2):
            state, metrics = step(state, synthetic_batch(config, setup.batch_sharding, seed))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_sharded_step_matches_single_device(config):
    one, params_one = _two_steps(_config(config, 1, 1, 1), jax.devices()[:1])
    many, params_many = _two_steps(_config(config, 2, 2, 2), jax.devices())
    np.testing.assert_allclose(one, many, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params_one,
                 params_many)
    # the state really is spread over the devices
    assert len(jax.devices()) == 8


def test_gradient_accumulation_matches_full_batch(config):
    config.opt.clip_norm = 0.0
    full, p_full = _two_steps(_config(config, -1, 1, 1), jax.devices())    # 8 rows on 8 devices
    config.opt.grad_accum = 2
    acc, p_acc = _two_steps(_config(config, 4, 1, 1), jax.devices()[:4])   # 2 x 4 rows on 4
    np.testing.assert_allclose(full, acc, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), p_full, p_acc)
