"""Every shipped config validates, builds its sharded state layout, and has the size it claims."""
import glob
import os

import jax
import pytest

from train import families
from configs.base import HELP, get_config
from configs.loader import flat_items, load
from train.config import validate
from train.setup import build

# experiment files: those defining get_config(), apart from the base they derive from
CONFIGS = sorted(p for p in glob.glob("configs/*.py") if not p.endswith("base.py")
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
