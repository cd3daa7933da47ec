"""Pruning and layer dropping (train/pruning.py, train/compress/): gradual pruning inside the
train step through resume, N:M masks, the cubic schedule, one-shot `train.compress prune` and
`drop-layers` end to end, and their bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.loader import load
from model.config import ModelConfig
from model.decoder import DecoderBlock
from model.layers import norm
from train import families, pruning
from train.checkpoint import Checkpointer
from train.compress.__main__ import main as compress_main
from train.compress.layer_drop import keep_layers
from train.compress.oneshot import prune_params
from train.loop import read_metrics, train
from train import state as state_lib
from train.restore import restore, saved_config
from train.setup import build


def _kernels(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_flatten_with_path(params)[0] if pruning.leaf_kind(p)}


def _state(workdir, step):
    """The full train state of a run's checkpoint, on this host."""
    config, _ = saved_config(workdir, step)
    setup = build(config)
    abstract = state_lib.abstract(setup.model, setup.model_cfg, setup.tx, setup.state_shardings)
    return jax.device_get(Checkpointer(workdir, read_only=True).restore_state(step, abstract))


def test_gradual_pruning_stays_zero_through_updates_and_resume(config, tmp_path):
    """Masks ramp to 0.8 by step 6 in a sharded step; the pruned weights stay exactly zero for
    the steps after although AdamW's moments there are not; a resumed run repeats the
    uninterrupted one bit for bit."""
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.prune.update(target=0.8, start=2, end=6, every=2)
    config.train.update(steps=8, log_every=1)
    config.eval.update(every=0)
    config.ckpt.update(every=6)
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=4)
    train(config, tmp_path / "resumed", progress=False)
    logs = {name: {r["step"]: (r["loss"], r["sparsity"]) for r in read_metrics(tmp_path / name)
                   if "sparsity" in r} for name in ("straight", "resumed")}
    assert logs["straight"] == logs["resumed"]             # exact, every step
    logged = [logs["straight"][t][1] for t in range(1, 9)]
    np.testing.assert_allclose(logged, [pruning.schedule(config.prune, t) for t in range(1, 9)],
                               atol=2e-3)                    # whole weights: rounding only
    assert logged[0] == 0 and logged[-1] == pytest.approx(0.8, abs=2e-3)
    at6, at10 = _state(tmp_path / "straight", 6), _state(tmp_path / "straight", 8)
    k6, k10 = _kernels(at6.params), _kernels(at10.params)
    masks10 = _kernels(pruning.find_state(at10.opt_state).masks)
    mu10 = _kernels(pruning.find_state(at10.opt_state).inner[1][0].mu)
    for name, w in k10.items():
        assert np.all(w[k6[name] == 0] == 0), name              # pruned at 6: zero 2 steps on
        assert np.array_equal(w != 0, masks10[name]), name      # the masks are the zeros
        for layer in w.reshape(w.shape[0], -1):                 # scope=layer: each layer 0.8
            assert abs(np.mean(layer == 0) - 0.8) < 1 / layer.size + 1e-9
        assert np.any(mu10[name][w == 0] != 0)                  # the optimizer would revive


def test_schedule_is_cubic_between_start_and_end():
    prune = dict(target=0.9, start=10, end=50, every=10)
    got = [float(pruning.schedule(prune, t)) for t in (1, 9, 10, 19, 20, 30, 45, 50, 99)]
    cubic = lambda t: 0.9 * (1 - (1 - (t - 10) / 40) ** 3)   # noqa: E731
    want = [0, 0, cubic(10), cubic(10), cubic(20), cubic(30), cubic(40), 0.9, 0.9]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    updates = [t for t in range(60) if pruning.updates_masks(prune, t)]
    assert updates == [10, 20, 30, 40, 50]


@pytest.mark.parametrize("nm", [(2, 4), (1, 8)])
def test_nm_masks_keep_exactly_n_of_every_m_along_the_input(nm):
    cfg = ModelConfig.create(family="decoder", vocab_size=64, d_model=32, n_heads=4,
                             n_layers=2, d_ff=64, max_len=16, dtype="float32",
                             scan_layers=True)
    model = families.build(cfg)
    params = model.init(jax.random.PRNGKey(0), *families.init_inputs(cfg))["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    pruned = prune_params(params, 1 - nm[0] / nm[1], f"{nm[0]}:{nm[1]}", "layer")
    n, m = nm
    kernels = _kernels(pruned)
    assert {k.split("'")[-2] for k in kernels} == {"kernel"} and len(kernels) == 6
    for name, w in kernels.items():
        n_in = 2 if "'out'" in name else 1
        l, rest = w.shape[0], w.shape[1:]
        w_LxIxO = w.reshape(l, int(np.prod(rest[:n_in])), -1)
        groups = (w_LxIxO != 0).reshape(l, -1, m, w_LxIxO.shape[-1]).sum(axis=2)
        assert np.all(groups == n), name
    assert np.array_equal(np.asarray(pruned["embed"]["embedding"]),
                          np.asarray(params["embed"]["embedding"]))   # embeddings stay dense


@pytest.mark.parametrize("scan", [True, False])
def test_dropped_layers_equal_the_kept_blocks_run_by_hand(scan):
    cfg = ModelConfig.create(family="decoder", vocab_size=64, d_model=32, n_heads=4,
                             n_layers=4, d_ff=64, max_len=16, dtype="float32",
                             scan_layers=scan)
    params = families.build(cfg).init(jax.random.PRNGKey(1), *families.init_inputs(cfg))
    params = nn_unbox(params["params"])
    keep = [0, 2, 3]
    small = ModelConfig.create(**{**cfg.__dict__, "n_layers": len(keep)})
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 64)
    got = families.build(small).apply({"params": keep_layers(params, keep)}, tokens)

    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    x = params["embed"]["embedding"][tokens]
    for i in keep:
        block = (jax.tree.map(lambda a: a[i], params["layers"]) if scan
                 else params[f"layers_{i}"])
        x, _ = DecoderBlock(cfg).apply({"params": block}, x, pos, None)
    x = norm(cfg).apply({"params": params["final_norm"]}, x)
    want = x @ params["embed"]["embedding"].T
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_encoder_decoder_stacks_are_cut_separately():
    cfg = ModelConfig.create(family="encoder_decoder", vocab_size=64, d_model=32, n_heads=4,
                             n_layers=3, d_ff=64, max_len=16, dtype="float32", scan_layers=False)
    params = nn_unbox(families.build(cfg).init(jax.random.PRNGKey(0),
                                               *families.init_inputs(cfg))["params"])
    kept = keep_layers(params, [0, 2], [1])
    assert sorted(k for k in kept["encoder"] if k.startswith("layers")) == ["layers_0",
                                                                            "layers_1"]
    assert [k for k in kept["decoder"] if k.startswith("layers")] == ["layers_0"]
    assert kept["encoder"]["layers_1"] is params["encoder"]["layers_2"]
    assert kept["decoder"]["layers_0"] is params["decoder"]["layers_1"]


def nn_unbox(tree):
    return jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, tree,
                        is_leaf=lambda x: hasattr(x, "unbox"))


@pytest.fixture(scope="module")
def trained(data_dir, tokenizer_path, tmp_path_factory):
    from conftest import tiny_config
    config = tiny_config(data_dir, tokenizer_path)
    config.model.n_layers = 3
    config.train.update(steps=2)
    config.eval.update(every=0, steps=1)
    workdir = tmp_path_factory.mktemp("trained")
    train(config, workdir, progress=False)
    return workdir


def test_prune_cli_writes_a_run_that_restores_and_trains_with_its_masks(trained, tmp_path):
    out = tmp_path / "pruned"
    compress_main(["prune", "--workdir", str(trained), "--out", str(out), "--pattern", "2:4"])
    report = json.loads((out / "prune.json").read_text())
    assert report["sparsity"] == 0.5 and report["per_layer"]["all"] == pytest.approx(0.5)
    restored = restore(out)                                   # what eval/generate/export read
    before = _kernels(restored.params)
    assert all(np.mean(w == 0) == 0.5 for w in before.values())
    assert restored.config.prune.pattern == "2:4"
    config = load(out / "config.py")
    config.train.update(steps=3)
    config.eval.update(steps=1)
    train(config, out, progress=False)                        # fine-tune on, masks kept
    after = _kernels(_state(out, 3).params)
    for name, w in after.items():
        assert np.array_equal(w == 0, before[name] == 0), name
        assert not np.array_equal(w, before[name]), name      # the kept weights trained


def test_drop_layers_cli_writes_the_shallower_run(trained, tmp_path):
    out = tmp_path / "dropped"
    compress_main(["drop-layers", "--workdir", str(trained), "--out", str(out), "--keep", "0,2"])
    src, new = restore(trained), restore(out)
    assert new.config.model.n_layers == 2
    a, b = src.params["layers"], new.params["layers"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x)[[0, 2]], np.asarray(y))


@pytest.mark.parametrize("argv, message", [
    (["prune", "--sparsity", "1.0"], "--sparsity 1.0: the fraction of weights pruned must be "
                                     "in [0, 1)"),
    (["prune", "--sparsity", "-0.1"], "must be in [0, 1)"),
    (["prune", "--pattern", "4:2"], "--pattern='4:2': use unstructured or N:M with 0 < N < M"),
    (["prune", "--pattern", "2:5"], "groups 5 weights along each kernel's input dimension, but "
                                    "d_model (query, key, value, wi)=32"),
    (["drop-layers", "--keep", "0,3"], "--keep: block(s) [3] out of range; the model has 3 "
                                       "blocks (0..2)"),
    (["drop-layers", "--keep", "1,1"], "--keep: block(s) [1] listed twice"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        compress_main(argv[:1] + ["--workdir", str(trained), "--out", str(out)] + argv[1:])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
