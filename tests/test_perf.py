"""The benchmark's reports and the faster attention/MLP paths it measures (no timing asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from model import attention
from model.config import ModelConfig
from model.layers import Mlp
from train.perf import compile_time, loop_overhead

ROOT = Path(__file__).resolve().parents[1]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def packed_segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Rows of contiguous segments 1, 2, ... of random lengths, padded with 0 at the end."""
    rows = np.zeros((batch, length), np.int32)
    for row in rows:
        at, segment = 0, 1
        end = length - int(rng.integers(0, length // 4))
        while at < end:
            n = int(rng.integers(1, length // 2))
            row[at:min(at + n, end)] = segment
            at, segment = at + n, segment + 1
    return rows


def test_xla_attention_matches_jax_on_packed_segments():
    rng = np.random.default_rng(0)
    B, T, K = 3, 24, 8
    segments = jnp.asarray(packed_segments(rng, B, T))
    mask = attention.segment_mask(segments, segments)
    for heads, kv_heads in ((4, 4), (4, 2)):
        q = jnp.asarray(rng.normal(size=(B, T, heads, K)), jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(B, T, kv_heads, K)), jnp.float32) for _ in "kv")
        for is_causal in (True, False):
            ours = attention.xla_attention(q, k, v, mask, is_causal)
            jaxs = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                                implementation="xla")
            real = np.asarray(segments != 0)   # padding rows attend to nothing: any output
            np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(jaxs)[real],
                                       rtol=1e-5, atol=1e-5)


def test_packed_lengths_describe_the_segment_mask():
    """cuDNN's packed layout (lengths, offsets) admits exactly the pairs the dense mask does."""
    segments = packed_segments(np.random.default_rng(1), 4, 32)
    lengths, offsets = map(np.asarray, attention.packed_lengths(jnp.asarray(segments)))
    assert lengths.shape == (4, 32) and offsets.shape == (4, 33)
    dense = np.asarray(attention.segment_mask(jnp.asarray(segments), jnp.asarray(segments)))[:, 0]
    for b in range(4):
        rebuilt = np.zeros((32, 32), bool)
        for n, start in zip(lengths[b], offsets[b]):
            if n > 0:
                rebuilt[start:start + n, start:start + n] = True
        assert (lengths[b] > 0).sum() == segments[b].max()
        np.testing.assert_array_equal(rebuilt, dense[b])


def test_swiglu_from_kernel_slices_matches_the_fused_projection():
    cfg = ModelConfig.from_mapping({**get_config().model.to_dict(), "d_model": 16, "n_heads": 2, "d_ff": 24,
                                    "dtype": "float32", "vocab_size": 64})
    mlp = Mlp(cfg, 0.02)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    params = mlp.init(jax.random.PRNGKey(1), x)["params"]
    params = nn.meta.unbox(params)
    wi, wo = params["wi"]["kernel"], params["wo"]["kernel"]
    assert wi.shape == (16, 2, 24)   # the checkpoint / HF layout is unchanged
    h = jnp.einsum("btd,dkf->btkf", x, wi)
    expected = (nn.silu(h[:, :, 0]) * h[:, :, 1]) @ wo
    np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_benchmark_cli_prints_both_dtypes_and_the_memory_report():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    tiny = ["--config", "configs/bench_tiny.py", "--config.model.n_layers=1",
            "--config.data.seq_len=32", "--config.model.max_len=32"]
    out = subprocess.run([sys.executable, "-m", "train.benchmark", *tiny, "--steps", "1",
                          "--dtypes", "float32,bfloat16"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    rows = json_lines(out.stdout)
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert all(r["tok_per_s"] > 0 and r["hlo_gflops"] > 0 and r["fusions"] > 0 for r in rows)

    out = subprocess.run([sys.executable, "-m", "train.benchmark", "--memory", *tiny],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    rows = {tuple(sorted((k, v) for k, v in r["mesh"].items() if k != "sequence")): r
            for r in json_lines(out.stdout)}
    fsdp1 = rows[(("data", 8), ("fsdp", 1), ("tensor", 1))]
    fsdp8 = rows[(("data", 1), ("fsdp", 8), ("tensor", 1))]
    full = fsdp1["params_bytes"] + fsdp1["opt_state_bytes"]
    assert fsdp1["params_bytes"] == pytest.approx(4e6 * fsdp1["params_M"], rel=0.05)  # all
    assert fsdp8["params_bytes"] + fsdp8["opt_state_bytes"] <= full / 7
    assert rows[(("data", 2), ("fsdp", 1), ("tensor", 4))]["params_bytes"] < fsdp1["params_bytes"]
    assert all(r["temp_bytes"] > 0 and r["argument_bytes"] >= r["params_bytes"]
               for r in rows.values())


def test_compile_report_covers_scanned_and_unrolled_depths():
    cfg = get_config()
    cfg.model.update(vocab_size=256, d_model=32, n_heads=2, d_ff=64, max_len=16,
                     dtype="float32")
    cfg.data.update(seq_len=16, batch_size=8)
    rows = compile_time.report(cfg, depths=(1, 2))
    assert [(r["scan_layers"], r["n_layers"]) for r in rows] == [
        (True, 1), (True, 2), (False, 1), (False, 2)]
    assert all(r["compile_s"] > 0 for r in rows) and rows[0]["vs_first"] == 1.0


def test_loop_report_times_the_real_loop_against_the_bare_step(config, capsys):
    summary = loop_overhead.report(config, steps=8, ckpt_every=4, log_every=2, rounds=1)
    rows = json_lines(capsys.readouterr().out)
    assert rows[0]["report"] == "loop" and rows[0]["timed_steps"] == 6
    assert rows[0]["checkpoints_in_window"] == 1     # steps 4 and 8 are saved; 4's is timed
    assert summary["loop_tok_per_s"] > 0 and summary["bare_tok_per_s"] > 0
    assert summary["ratio"] == pytest.approx(
        summary["loop_tok_per_s"] / summary["bare_tok_per_s"], abs=0.01)
    # the process's CPU seconds per step, read at the same logged steps / around the bare steps
    assert summary["loop_cpu_s_per_step"] > 0 and summary["bare_cpu_s_per_step"] > 0
    assert summary["cpu_ratio"] == pytest.approx(
        summary["bare_cpu_s_per_step"] / summary["loop_cpu_s_per_step"], abs=0.01)
