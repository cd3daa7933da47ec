"""Every shipped config validates, builds its sharded state layout, has the size it claims, and
(shrunk) takes a real train step."""
import glob
import os

import jax
import numpy as np
import pytest

from configs.base import HELP, get_config
from configs.loader import flat_items, load
from model.sharding import activate
from train import families
from train import state as state_lib
from train.config import validate
from train.setup import build

# experiment files: those defining get_config(), apart from the base they derive from
CONFIGS = sorted(p for p in glob.glob("configs/*.py") if os.path.basename(p) != "base.py"
                 and "def get_config(" in open(p).read())
EXPECTED_PARAMS_M = {"gpt_125m": (100, 150), "gpt_350m": (300, 420), "gpt_1_3b": (1150, 1500)}


def test_every_key_is_documented():
    keys = {k for k, _ in flat_items(get_config())}
    assert keys == set(HELP)


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_config_builds(path):
    config = load(path)
    validate(config)
    if not config.model.vocab_size:
        config.model.vocab_size = config.data.tokenizer.vocab_size
    setup = build(config)       # shapes and shardings only: nothing is allocated
    shapes = jax.eval_shape(lambda: setup.model.init(jax.random.PRNGKey(0),
                                                     *families.init_inputs(setup.model_cfg)))
    n = sum(x.size for x in jax.tree.leaves(shapes)) / 1e6
    name = os.path.basename(path)[:-3]
    if name in EXPECTED_PARAMS_M:
        lo, hi = EXPECTED_PARAMS_M[name]
        assert lo < n < hi, (name, n)


# What a preset may change to step in seconds on a CPU: sizes only (and warmup, so the first
# step's learning rate is not 0). Its family, objective, blocks, dtypes, scan, remat, tying,
# mesh, optimizer and schedule are kept.
SMALL_MODEL = dict(vocab_size=128, d_model=32, n_heads=4, n_layers=1, d_ff=64, max_len=32)
SIZE_KEYS = set(SMALL_MODEL) | {"n_kv_heads", "head_dim", "n_decoder_layers"}


def shrunk(config):
    config.model.update(SMALL_MODEL)
    config.model.update(n_kv_heads=min(config.model.n_kv_heads, 2), head_dim=0,
                        n_decoder_layers=min(config.model.n_decoder_layers, 1))
    config.data.update(seq_len=32, batch_size=8 * config.opt.grad_accum)  # 8 rows per micro
    config.opt.warmup_steps = 0
    return config


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_config_takes_a_train_step(path):
    preset = load(path)
    config = shrunk(load(path))
    validate(config)
    assert {k: v for k, v in config.model.items() if k not in SIZE_KEYS} == \
        {k: v for k, v in preset.model.items() if k not in SIZE_KEYS}
    setup = build(config)
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings,
                               config.train.seed)
        before = jax.device_get(state.params)      # the step donates the state
        state, metrics = setup.train_step()(
            state, families.synthetic_batch(config, setup.batch_sharding))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["lr"]) > 0
    assert int(state.step) == 1
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before,
                           jax.device_get(state.params))
    assert all(jax.tree.leaves(changed)), [jax.tree_util.keystr(p) for p, c in
                                           jax.tree_util.tree_flatten_with_path(changed)[0]
                                           if not c]
