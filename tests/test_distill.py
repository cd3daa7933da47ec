"""Knowledge distillation: the loss against a hand computation, the sharded step against the
one-device step, a real teacher run restored frozen under a smaller student (CLI end to end,
exact resume, a changed teacher refused) and bad input."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs.loader import apply_overrides, load
from conftest import CORPUS_DOCS
from errors import CheckpointError, ConfigError
from model.config import ModelConfig
from model.sharding import activate
from train import families, state as state_lib
from train.config import validate
from train.distill import teacher as distill_teacher
from train.distill.loss import distilled
from train.loop import read_metrics, train
from train.restore import restore
from train.setup import build

PRESET = "configs/distill_quickstart.py"
STUDENT = dict(d_model=16, n_heads=2, n_kv_heads=2, n_layers=1, d_ff=32)


@pytest.fixture(scope="module")
def teacher(data_dir, tokenizer_path, tmp_path_factory):
    """A tiny decoder run (conftest's tiny config, 8 steps, checkpoints at 4 and 8)."""
    from conftest import tiny_config
    workdir = tmp_path_factory.mktemp("teacher")
    train(tiny_config(data_dir, tokenizer_path), workdir, progress=False)
    return workdir


def _student(config, teacher_spec):
    config.model.update(STUDENT)
    config.data.tokenizer.path = ""          # the teacher's vocabulary is taken
    config.distill.update(teacher=teacher_spec, alpha=0.7, temperature=2.0)
    return config


def _model_and_params(cfg, objective, seed):
    model = families.build_for(cfg, objective, 4)
    params = model.init(jax.random.PRNGKey(seed), *families.init_inputs(cfg, model=model))
    return model, jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                               params["params"], is_leaf=lambda x: hasattr(x, "unbox"))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("objective,family,weights", [("clm", "decoder", "weights"),
                                                      ("mlm", "encoder", "weights"),
                                                      ("classify", "decoder", "label_weights")])
def test_distillation_loss_equals_a_hand_computed_kl(objective, family, weights):
    """alpha * T^2 * sum_w KL(p_t || p_s) + (1 - alpha) * CE, over the weighted positions only
    (next tokens with half the positions masked, the selected MLM positions, the kept rows)."""
    o = families.objective(objective)
    cfgs = [ModelConfig.create(family=family, vocab_size=64, dtype="float32", **kw)
            for kw in (STUDENT, dict(d_model=32, n_heads=4, n_layers=2, d_ff=64))]
    (student, sp), (teach, tp) = [_model_and_params(cfg, objective, seed)
                                  for seed, cfg in enumerate(cfgs)]
    batch = {k: np.asarray(v) for k, v in o.synthetic(4, 16, 64, 3).items()}
    if objective == "clm":
        batch[weights] = batch[weights] * (np.arange(16) % 2)[None]     # a loss mask
    elif objective == "classify":
        batch[weights] = np.array([1.0, 0.0, 1.0, 1.0], np.float32)    # a padding row
        # a fresh head's logits are nearly uniform: sharpen the teacher's, so the KL is large
        tp["head"]["out"]["kernel"] = tp["head"]["out"]["kernel"] * 300.0
    alpha, t = 0.3, 2.5
    rng = jax.random.PRNGKey(0)

    @jax.jit   # one program: the loss, its gradient in the teacher's params, both forward passes
    def run(p, t_p):
        loss = lambda t_p: distilled(o.loss, teach, alpha, t)(   # noqa: E731
            student, p, batch, rng=rng, train=False, teacher=t_p)
        (total, sums), teacher_grads = jax.value_and_grad(loss, has_aux=True)(t_p)
        return total, sums, teacher_grads, tuple(
            o.loss.forward(m, q, batch, rng=rng, train=False) for m, q in ((student, p),
                                                                          (teach, t_p)))
    total, sums, grads, outputs = jax.device_get(run(sp, tp))
    s, te = (np.asarray(out["mlm_logits"] if isinstance(out, dict) else out, np.float64)
             for out in outputs)
    w = batch[weights].reshape(s.shape[:-1]).astype(np.float64)
    targets = batch["labels" if objective == "classify" else "targets"].reshape(w.shape)
    p_t, log_q, log_p = np.exp(_log_softmax(te / t)), _log_softmax(s / t), _log_softmax(te / t)
    kl = np.sum(np.sum(p_t * (log_p - log_q), -1) * w)
    ce = np.sum(-np.take_along_axis(_log_softmax(s), targets[..., None], -1)[..., 0] * w)
    hard = ce
    if "pair_labels" in batch:   # mlm adds the sentence-pair loss, rescaled to the MLM weight
        pair = _log_softmax(np.asarray(outputs[0]["pair_logits"], np.float64))
        pw = batch["pair_weights"].astype(np.float64)
        pair_ce = np.sum(-np.take_along_axis(pair, batch["pair_labels"][:, None], -1)[:, 0] * pw)
        hard = ce + pair_ce * w.sum() / max(pw.sum(), 1.0)
    np.testing.assert_allclose(float(sums["loss"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(sums["distill_kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(total), alpha * t ** 2 * kl + (1 - alpha) * hard, rtol=1e-4)
    assert float(sums["weight"]) == w.sum() and kl > 0
    # no gradient reaches the teacher
    assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_sharded_distillation_step_equals_the_one_device_step(config, teacher):
    _student(config, f"{teacher}@best")
    config = distill_teacher.resolve(config)
    assert config.distill.teacher_checkpoint.endswith("@8")
    results = []
    for mesh, devices in ((dict(data=2, fsdp=2, tensor=2), jax.devices()),
                          (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
        config.mesh.update(mesh)
        validate(config, devices)
        setup = build(config, devices)
        with activate(setup.mesh, setup.rules):
            kd = distill_teacher.restore(setup)
            embedding = kd.params["embed"]["embedding"]
            assert embedding.shape[1] == 32 and embedding.sharding == kd.shardings["embed"][
                "embedding"]
            if len(devices) > 1:    # the teacher is laid out by the student's logical rules
                assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
            state = state_lib.init(setup.model, setup.model_cfg, setup.tx,
                                   setup.state_shardings, 0)
            state, metrics = setup.train_step(kd)(state, families.synthetic_batch(
                config, setup.batch_sharding))
            results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (a, ma), (b, mb) = results
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
    for key in ("loss", "distill_kl", "distill_loss"):
        np.testing.assert_allclose(ma[key], mb[key], rtol=2e-5)


def test_distil_a_decoder_on_the_cli_then_resume_exactly_and_refuse_another_teacher(
        teacher, data_dir, tmp_path):
    overrides = dict(
        **{f"model.{k}": v for k, v in STUDENT.items()}, **{"model.max_len": 64},
        **{"data.data_dir": data_dir, "data.max_docs": CORPUS_DOCS,
           "data.validation_percent": 10.0, "data.seq_len": 32, "data.batch_size": 8,
           "data.interleave": 8, "data.shuffle_window": 64, "opt.lr": 3e-3,
           "opt.warmup_steps": 2, "train.steps": 12, "train.log_every": 1, "eval.every": 6,
           "eval.steps": 2, "eval.sample_tokens": 8, "ckpt.every": 6,
           "ckpt.async_save": False, "distill.teacher": f"{teacher}@best"})
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")   # shared with this process
    proc = subprocess.run([sys.executable, "-m", "train", "--config", PRESET, "--workdir",
                           str(tmp_path / "cli"), "--no-progress", *args],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"distill: teacher {teacher.resolve()}@8 (decoder" in proc.stdout + proc.stderr
    records = read_metrics(tmp_path / "cli")
    steps = [r for r in records if "distill_kl" in r]
    assert len(steps) == 12 and any(r.get("split") == "eval" for r in records)
    first, last = (np.mean([r["distill_kl"] for r in part]) for part in (steps[:3], steps[-3:]))
    assert last < 0.8 * first, (first, last)             # the student moves to the teacher
    assert steps[-1]["loss"] < steps[0]["loss"]
    # the checkpoint holds the student alone, and restores like any run's (train.eval,
    # generate, export); its vocabulary is the teacher's
    run = restore(tmp_path / "cli")
    assert run.setup.model_cfg.d_model == 16
    assert run.config.data.tokenizer.fingerprint == json.loads(
        (teacher / "config.json").read_text())["data"]["tokenizer"]["fingerprint"]
    assert state_lib.param_count(run.params) < state_lib.param_count(restore(teacher).params) / 2
    # stopped after step 6 and resumed (the teacher restored again): the CLI run's params
    config = apply_overrides(load(PRESET), args)
    train(config, tmp_path / "resumed", progress=False, stop_after=6)
    train(config, tmp_path / "resumed", progress=False)
    resumed = jax.device_get(restore(tmp_path / "resumed").params)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(run.params), resumed))
    # another teacher checkpoint on resume is refused, naming the key
    config.distill.teacher = f"{teacher}@4"
    config.train.steps = 14
    with pytest.raises(CheckpointError, match=r"distill.teacher_checkpoint: '.*@8' -> '.*@4'"):
        train(config, tmp_path / "resumed", progress=False)


def test_bad_distillation_input_is_one_clear_error_and_writes_nothing(config, teacher,
                                                                      tmp_path):
    from data import tokenizer as tokenizer_lib
    from pydoc_data.topics import topics
    other = tmp_path / "other.model"
    tokenizer_lib.train(iter(topics.values()), vocab_size=600, max_chars=200_000).save(other)
    _student(config, str(teacher))
    config.data.tokenizer.path = str(other)
    with pytest.raises(ConfigError, match=r"another vocabulary .* than data.tokenizer.path=") \
            as e:
        train(config, tmp_path / "a", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "a").exists()
    _student(config, str(tmp_path))                       # not a run
    with pytest.raises(CheckpointError, match="is not a Loom run directory"):
        train(config, tmp_path / "b", progress=False)
    _student(config, f"{teacher}@999")
    with pytest.raises(CheckpointError, match=r"distill.teacher=.*@999: no checkpoint at step"):
        train(config, tmp_path / "b", progress=False)
    _student(config, str(teacher))
    config.train.objective, config.model.family = "mlm", "encoder"
    config.eval.sample_prompt = ""
    with pytest.raises(ConfigError, match="train.objective=clm, this run with mlm"):
        train(config, tmp_path / "c", progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    for key, value, message in (("alpha", 1.5, r"distill.alpha must be in \[0, 1\]"),
                                ("temperature", 0.0, "distill.temperature must be positive")):
        _student(config, str(teacher))
        config.distill[key] = value
        with pytest.raises(ConfigError, match=message):
            validate(config)
