"""Quantization (model/quant.py, train.compress quantize): PTQ logits near the float model's, a
smaller checkpoint, QAT whose PTQ export matches it, exact QAT resume, one-line bad input."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from errors import CheckpointError, ConfigError
from model import quant
from model.sharding import activate
from train import families, setup as setup_lib, state as state_lib
from train.compress.quantize import param_bytes, quantize_run
from train.loop import read_metrics, train
from train.restore import restore

# Stated tolerances: the largest logit error as a fraction of the largest float logit.
TOLERANCE = {("int8", ""): 0.02, ("int8", "int8"): 0.04, ("int4", ""): 0.15}


def _model_config(family):
    c = get_config()
    c.model.update(family=family, vocab_size=128, d_model=32, n_heads=4, n_kv_heads=2,
                   n_layers=2, d_ff=64, max_len=64, dtype="float32")
    if family == "encoder":
        c.train.objective = "mlm"
        c.model.update(pos="learned", norm="layernorm", mlp="gelu", n_kv_heads=0)
    return c


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_ptq_logits_are_within_tolerance_of_the_float_model(family):
    c = _model_config(family)
    float_setup = setup_lib.build(c)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 128, (8, 16)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (8, 16))
    segments = jnp.ones((8, 16), jnp.int32)
    with activate(float_setup.mesh, float_setup.rules):
        params = state_lib.init(float_setup.model, float_setup.model_cfg, float_setup.tx,
                                float_setup.state_shardings, 0).params
        logits = float_setup.model.apply({"params": params}, tokens, positions, segments)
        n_inputs = quant.dense_inputs(float_setup.model, *families.init_inputs(
            float_setup.model_cfg, model=float_setup.model))
        for (weights, activations), tolerance in TOLERANCE.items():
            c.quant.update(mode="ptq", weights=weights, activations=activations)
            q_setup = setup_lib.build(c)
            q_params = jax.device_put(quant.quantize_params(params, n_inputs, weights),
                                      q_setup.state_shardings.params)
            kernels = [x for x in jax.tree.leaves(q_params, is_leaf=lambda x: isinstance(
                x, quant.qwix.QArray)) if isinstance(x, quant.qwix.QArray)]
            assert len(kernels) == len(n_inputs) >= 6
            assert all(k.qvalue.dtype == quant.QTYPES[weights] for k in kernels)
            q_logits = q_setup.model.apply({"params": q_params}, tokens, positions, segments)
            errors = jax.tree.map(lambda q, f: float(jnp.max(jnp.abs(q - f)) /
                                                     jnp.max(jnp.abs(f))), q_logits, logits)
            error = max(jax.tree.leaves(errors))   # the encoder: MLM and sentence-pair logits
            assert 0 < error < tolerance, (weights, activations, error)


def _bytes(run: Path, step: int) -> int:
    return sum(f.stat().st_size for f in (run / "checkpoints" / str(step) / "params").rglob("*")
               if f.is_file())


def test_qat_run_resumes_exactly_and_quantizes_into_a_smaller_run_that_matches_it(
        config, tmp_path):
    config.model.update(d_model=64, d_ff=256)
    config.quant.update(mode="qat", weights="int8")
    config.train.update(steps=4, log_every=1)
    config.eval.update(every=0)
    config.ckpt.update(every=2)
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "qat", progress=False, stop_after=2)
    train(config, tmp_path / "qat", progress=False)
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / run)
               if "split" not in r and "loss" in r} for run in ("straight", "qat")]
    assert losses[0] == losses[1] and len(losses[0]) == 4   # exact resume of QAT

    # the CLI: quantize with the QAT run's settings, then evaluate the quantized run
    q_run = tmp_path / "qat-int8"
    cli = [sys.executable, "-m", "train.compress", "quantize", "--workdir",
           str(tmp_path / "qat"), "--out", str(q_run), "--weights", "int8"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "to int8" in done.stdout
    evaluated = subprocess.run([sys.executable, "-m", "train.eval", "--workdir", str(q_run),
                                "--steps", "2"], capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "loss" in evaluated.stdout

    # QAT -> PTQ: the quantized run's logits are the QAT model's
    qat, ptq = restore(tmp_path / "qat"), restore(q_run)
    assert ptq.config.quant.mode == "ptq" and quant.is_quantized(ptq.params)
    tokens = jnp.asarray(np.random.RandomState(1).randint(3, 500, (8, 32)), jnp.int32)
    args = (tokens, jnp.broadcast_to(jnp.arange(32), (8, 32)), jnp.ones((8, 32), jnp.int32))
    with activate(ptq.setup.mesh, ptq.setup.rules):
        qat_logits = qat.setup.model.apply({"params": qat.params}, *args)
        ptq_logits = ptq.setup.model.apply({"params": ptq.params}, *args)
        plain = families.build(qat.setup.model_cfg).apply({"params": qat.params}, *args)
    assert float(jnp.max(jnp.abs(qat_logits - ptq_logits))) < 1e-4
    assert float(jnp.max(jnp.abs(qat_logits - plain))) > 1e-3   # QAT really quantized

    # generation (KV cache) runs on the quantized weights
    from train.decoding.generate import generate_run
    from train.decoding.options import Options
    texts = generate_run(q_run, "latest", ["def "], options=Options(), max_new_tokens=6)
    assert texts and texts[0].startswith("def ")

    # int8 activations with static scales calibrated on 2 train batches: near the QAT model
    quantize_run(tmp_path / "qat", tmp_path / "qat-w8a8", weights="int8", activations="int8",
                 calibration_batches=2)
    static = restore(tmp_path / "qat-w8a8")
    scales = [v for p, v in jax.tree_util.tree_flatten_with_path(static.params)[0]
              if "input_scale" in jax.tree_util.keystr(p)]
    assert scales and all(float(jnp.min(s)) > 0 for s in scales)
    with activate(static.setup.mesh, static.setup.rules):
        static_logits = static.setup.model.apply({"params": static.params}, *args)
    error = float(jnp.max(jnp.abs(static_logits - qat_logits)) / jnp.max(jnp.abs(qat_logits)))
    assert 0 < error < TOLERANCE[("int8", "int8")] * 2, error

    # on disk: int8 kernels take about a quarter of their float32 bytes, int4 less still
    int4 = quantize_run(tmp_path / "qat", tmp_path / "qat-int4", weights="int4")
    float_bytes, int8_bytes = _bytes(tmp_path / "qat", 4), _bytes(q_run, 4)
    int4_bytes = _bytes(tmp_path / "qat-int4", 4)
    expected = int4["float_bytes"] / param_bytes(ptq.params)
    assert float_bytes / int8_bytes == pytest.approx(expected, rel=0.25), (
        float_bytes, int8_bytes, expected)
    assert int4_bytes < int8_bytes * 0.85, (int4_bytes, int8_bytes)

    # bad input: one line each, nothing written
    bad = [(dict(workdir=q_run, out=tmp_path / "again", weights="int8"), "already quantized"),
           (dict(workdir=tmp_path / "qat", out=tmp_path / "w", weights="int3"), "--weights"),
           (dict(workdir=tmp_path / "none", out=tmp_path / "m", weights="int8"),
            "no checkpoints"),
           (dict(workdir=tmp_path / "qat", out=tmp_path / "s", weights="int8", step=99),
            "no checkpoint at step 99"),
           (dict(workdir=tmp_path / "qat", out=q_run, weights="int8"), "already exists")]
    for kwargs, message in bad:
        with pytest.raises((ConfigError, CheckpointError), match=message) as e:
            quantize_run(**kwargs)
        assert "\n" not in str(e.value)
        assert kwargs["out"] == q_run or not kwargs["out"].exists()
