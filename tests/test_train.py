"""End-to-end training on real text: learning, exact resume, checkpoint retention, bad input."""
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.loader import apply_overrides, load
from errors import DataError
from errors import MeshError
from errors import ConfigError
from train.checkpoint import Checkpointer
from train.loop import read_metrics, train
from train.state import TrainState


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)
            if "split" not in r and "loss" in r}


def test_loss_falls_on_real_text(config, tmp_path):
    config.train.update(steps=40, log_every=5)
    config.eval.update(every=20, steps=4, sample_prompt="def ", sample_tokens=8)
    config.ckpt.update(every=20)
    result = train(config, tmp_path, progress=False)
    losses = train_losses(tmp_path)
    evals = [r for r in read_metrics(tmp_path) if r.get("split") == "eval"]
    assert losses[40] < losses[5] - 1.0, losses
    assert evals[-1]["loss"] < math.log(config.model.vocab_size or 512) - 1.0
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]), rel=1e-6)
    assert result["sample"].startswith("def ") and len(result["sample"]) > len("def ")
    # every logged training record has what the README promises
    record = next(r for r in read_metrics(tmp_path) if r["step"] == 40 and "grad_norm" in r)
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "step_time"} <= set(record)
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "tokenizer.model").is_file()


def test_resumed_run_repeats_uninterrupted_run_bit_for_bit(config, tmp_path):
    config.train.update(steps=8, log_every=1)
    config.model.dropout = 0.1                      # the RNG stream must resume too
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=5)
    assert max(train_losses(tmp_path / "resumed")) == 5
    train(config, tmp_path / "resumed", progress=False)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    assert straight == resumed                       # exact float equality, every step


def test_resume_with_a_different_model_is_refused(config, tmp_path):
    train(config, tmp_path, progress=False, stop_after=4)
    config.model.d_model = 64
    with pytest.raises(Exception, match="model.d_model: 32 -> 64"):
        train(config, tmp_path, progress=False)


def _state(value):
    return TrainState(step=jnp.array(0), params={"w": jnp.full((4,), value)},
                      opt_state={"m": jnp.zeros((4,))}, rng=jax.random.PRNGKey(0))


def test_keep_best_keeps_the_lowest_eval_loss(tmp_path):
    ckpt = Checkpointer(tmp_path, {"keep": 2, "keep_best": 1, "async_save": False})
    for step, loss in enumerate([5.0, 3.0, 4.0, 6.0, 7.0, 8.0], start=1):
        ckpt.save(step, _state(float(step)), config={}, eval_loss=loss)
    ckpt.save(7, _state(7.0), config={})           # a checkpoint without an eval
    ckpt.wait()
    assert ckpt.steps() == [2, 6, 7]
    assert ckpt.best_step() == 2 and ckpt.resolve("best") == 2 and ckpt.resolve("latest") == 7
    params = ckpt.restore_params(2, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(params["w"], np.full((4,), 2.0))
    ckpt.close()
    reopened = Checkpointer(tmp_path, {"keep": 2, "keep_best": 1, "async_save": False})
    reopened.save(8, _state(8.0), config={}, eval_loss=9.0)   # a restarted run keeps step 2
    reopened.wait()
    assert reopened.steps() == [2, 7, 8] and reopened.best_step() == 2


def test_bad_config_keys_and_values_are_named(config):
    with pytest.raises(ConfigError, match=r"unknown config key 'opt.lrr'; did you mean opt.lr\?"):
        apply_overrides(config, ["--config.opt.lrr=1e-3"])
    with pytest.raises(ConfigError, match="train.steps='ten': expected a int"):
        apply_overrides(config, ["--config.train.steps=ten"])
    with pytest.raises(ConfigError, match="is a group"):
        apply_overrides(config, ["--config.opt=1"])
    apply_overrides(config, ["--config.opt.lr", "0.5", "--config.data.paths=a/*.txt,b.txt",
                             "--config.model.scan_layers=false"])
    assert config.opt.lr == 0.5 and config.data.paths == ("a/*.txt", "b.txt")
    assert config.model.scan_layers is False
    with pytest.raises(ConfigError, match="does not exist"):
        load("configs/nope.py")


def test_bad_values_fail_before_compiling(config, tmp_path):
    config.opt.schedule = "cosine_annealing"
    with pytest.raises(ConfigError, match="opt.schedule='cosine_annealing'"):
        train(config, tmp_path, progress=False)


def test_missing_data_path_is_a_clear_error(config, tmp_path):
    config.data.update(source="text_files", paths=(str(tmp_path / "missing" / "*.txt"),))
    config.data.tokenizer.path = ""
    with pytest.raises(DataError, match="match no files"):
        train(config, tmp_path / "run", progress=False)


def test_mesh_that_does_not_fit_is_a_clear_error(config, tmp_path):
    config.mesh.update(data=3, fsdp=1, tensor=1)
    with pytest.raises(MeshError, match="needs 3 devices but 8 are present"):
        train(config, tmp_path, progress=False)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "train", "--config", "configs/quickstart.py",
           "--workdir", str(tmp_path), "--config.model.d_modle=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: unknown config key 'model.d_modle'; did you mean model.d_model? "
        "(keys in model: " + ", ".join(sorted(json.loads(json.dumps(
            load("configs/quickstart.py").model.to_dict())))) + ")")
    assert "Traceback" not in out.stderr
    helped = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "--config.opt.lr" in helped.stdout
