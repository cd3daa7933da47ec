"""Surviving faults with real processes, signals and files: SIGTERM/SIGINT checkpoint the step in
flight, kill -9 at random moments resumes exactly, damaged checkpoints fall back to the previous
one, NaN/Inf halts or skips, the workdir lock, resume config checks, a failing save."""
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from configs.loader import load
from data import pipeline
from data.tokenizer import MODEL_FILE, Tokenizer
from errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from train import __main__ as train_cli, eval as eval_cli, export as export_cli
from train import state as state_lib, workdir as workdir_lib
from train.checkpoint import Checkpointer
from train.hf import convert
from train.loop import read_metrics, train
from train.setup import build, with_vocab


def train_records(workdir):
    return [r for r in read_metrics(workdir) if "split" not in r and "loss" in r]


def losses(workdir):
    return {r["step"]: r["loss"] for r in train_records(workdir)}


def config_file(config, tmp_path) -> Path:
    """The config as a file `python -m train --config` loads."""
    (tmp_path / "cfg.json").write_text(config.to_json())
    path = tmp_path / "cfg.py"
    path.write_text("import json, pathlib\nfrom ml_collections import ConfigDict\n"
                    "def get_config():\n    return ConfigDict(json.loads((pathlib.Path("
                    "__file__).parent / 'cfg.json').read_text()))\n")
    return path


_started = iter(range(10**6))


def start(cfg_path, workdir, *args, **kwargs) -> subprocess.Popen:
    """`python -m train` in the background; its output goes to files (a pipe nobody reads
    would block it), read back by `finish`."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    logs = Path(cfg_path).parent / f"proc-{next(_started)}"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--config", str(cfg_path),
                             "--workdir", str(workdir), "--no-progress", *args], env=env,
                            stdout=open(f"{logs}.out", "w"), stderr=open(f"{logs}.err", "w"),
                            **kwargs)
    proc.logs = logs
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    return (Path(f"{proc.logs}.out").read_text(), Path(f"{proc.logs}.err").read_text())


def wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Blocks until metrics.jsonl logs a training step >= `step`; returns the latest logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, finish(proc)
        if (workdir / "metrics.jsonl").exists():
            logged = [r["step"] for r in train_records(workdir)]
            if logged and max(logged) >= step:
                return max(logged)
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


def test_sigterm_and_sigint_checkpoint_the_step_in_flight(config, tmp_path):
    config.train.update(steps=2000, log_every=1)
    config.ckpt.update(every=500, async_save=True)
    config.eval.update(every=0)
    cfg, workdir = config_file(config, tmp_path), tmp_path / "run"
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = start(cfg, workdir)
        wait_for_step(workdir, (stopped[-1] if stopped else 0) + 20, proc)
        sent = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=60)
        took = time.monotonic() - sent
        out, err = finish(proc)
        assert proc.returncode == 0 and "Traceback" not in err, err
        step = max(r["step"] for r in train_records(workdir))
        assert Checkpointer(workdir).steps()[-1] == step        # the step in flight, saved
        assert f"stopped by {sig.name}: checkpointed step {step}" in out
        assert took < config.train.preempt_grace_s, took
        saved_in = out.split(f"checkpointed step {step} ")[1].split(" s after")[0]
        print(f"{sig.name}: stopped at step {step}, checkpointed {saved_in} s and exited "
              f"{took:.2f} s after the signal")
        stopped.append(step)
    # the second run resumed right after the first one's stop
    steps = [r["step"] for r in train_records(workdir)]
    assert steps[steps.index(stopped[0]) + 1] == stopped[0] + 1

    proc = start(cfg, workdir)
    wait_for_step(workdir, stopped[-1] + 5, proc)
    proc.send_signal(signal.SIGINT)
    while "SIGINT: finishing" not in Path(f"{proc.logs}.out").read_text():   # handled once
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc, 60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "second interrupt: aborting now, without a checkpoint" in err


def test_kill_9_at_random_moments_resumes_exactly(config, tmp_path):
    config.train.update(steps=160, log_every=1)
    config.ckpt.update(every=10, keep=2, keep_best=0, async_save=True)
    config.eval.update(every=0, steps=1)
    straight = tmp_path / "straight"
    train(config, straight, progress=False)
    expected = losses(straight)
    cfg, workdir = config_file(config, tmp_path), tmp_path / "killed"
    rng = random.Random(12)
    kills = 0
    for trial in range(3):
        proc = start(cfg, workdir)
        done = max([r["step"] for r in train_records(workdir)], default=0) \
            if (workdir / "metrics.jsonl").exists() else 0
        wait_for_step(workdir, done + 1, proc)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        finish(proc)
    proc = start(cfg, workdir)     # the lock of the killed runs is not stuck
    out, err = finish(proc)
    assert proc.returncode == 0, err
    records = train_records(workdir)
    assert kills >= 2 and len(records) > len(expected)   # steps after a checkpoint ran again
    assert {r["step"] for r in records} == set(expected)
    mismatched = [r["step"] for r in records if r["loss"] != expected[r["step"]]]
    assert not mismatched, mismatched                      # exact float equality, every record
    print(f"{kills} kill -9 trials, {len(records)} logged steps, all equal the straight run")


def _corrupt_cases():
    def chunk(step_dir):   # the largest data file of the params item
        return max((p for p in (step_dir / "params").rglob("*") if p.is_file()
                    and p.parent.name == "d"), key=lambda p: p.stat().st_size)

    def truncate(d):
        f = chunk(d)
        os.truncate(f, f.stat().st_size // 2)

    def garbage(d):
        f = chunk(d)
        f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))

    def delete(d):
        chunk(d).unlink()

    def no_data(d):
        shutil.rmtree(d / "data")

    def only_params(d):
        for p in d.iterdir():
            if p.name != "params":
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    return dict(truncate=truncate, garbage=garbage, delete=delete, no_data=no_data,
                only_params=only_params)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(config, tmp_path, capsys):
    config.train.update(steps=8, log_every=1)
    config.ckpt.update(every=4, keep=3)
    train(config, tmp_path / "run", progress=False)
    original = losses(tmp_path / "run")
    for name, damage in _corrupt_cases().items():
        workdir = tmp_path / name
        shutil.copytree(tmp_path / "run", workdir)
        damage(workdir / "checkpoints" / "8")
        (workdir / "checkpoints" / "12.orbax-checkpoint-tmp-123").mkdir()  # a killed save's
        if name == "truncate":   # train.eval on it: one line naming it
            with pytest.raises(SystemExit):
                eval_cli.main(["--workdir", str(workdir), "--step", "8"])
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: checkpoint {workdir}/checkpoints/8 cannot be read")
            assert "\n" not in err and "use another step ([4])" in err, err
        capsys.readouterr()
        train(config, workdir, progress=False)
        out = capsys.readouterr().out
        assert f"checkpoint {workdir}/checkpoints/8 " in out and "moved it to" in out, name
        assert "removed 1 unfinished checkpoint save(s)" in out
        assert len(list((workdir / "checkpoints.corrupt").iterdir())) == 1
        assert Checkpointer(workdir).steps() == [4, 8]
        records = train_records(workdir)
        assert [r["step"] for r in records[-4:]] == [5, 6, 7, 8]
        assert all(r["loss"] == original[r["step"]] for r in records), name

    # nothing reads: the checkpoints stay where they were, and the error names them
    workdir = tmp_path / "truncate"
    for step in (4, 8):
        _corrupt_cases()["truncate"](workdir / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read \(steps \[4, 8\]"):
        train(config, workdir, progress=False)
    assert Checkpointer(workdir).steps() == [4, 8]


def test_nonfinite_halts_before_checkpointing_or_skips(config, tmp_path):
    config.train.update(steps=16, log_every=1)
    config.ckpt.update(every=2, keep=2, keep_best=0)
    config.opt.update(lr=1e4, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step (\d+); halted") as e:
        train(config, tmp_path / "halt", progress=False)
    ckpt = Checkpointer(tmp_path / "halt")
    good = ckpt.steps()[-1]
    assert f"the last good checkpoint is step {good}" in str(e.value)
    bad = int(str(e.value).split("NaN/Inf at step ")[1].split(";")[0])
    assert good < bad and ckpt.steps() == [s for s in (good - 2, good) if s > 0]  # none lost
    logged = {r["step"]: r for r in train_records(tmp_path / "halt")}
    assert logged[bad]["nonfinite"] == 1 and max(logged) < 16
    for step in ckpt.steps():
        state = ckpt.restore_params(step, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _abstract_params(config)))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))

    config.train.nonfinite = "skip"
    train(config, tmp_path / "skip", progress=False)
    records = train_records(tmp_path / "skip")
    assert records[-1]["step"] == 16 and records[-1]["skipped_steps"] == sum(
        r["nonfinite"] for r in records) > 0


def _abstract_params(config):
    tokenizer = Tokenizer.load(config.data.tokenizer.path)
    setup = build(with_vocab(config, tokenizer))
    return state_lib.abstract(setup.model, setup.model_cfg, setup.tx,
                              setup.state_shardings).params


def test_skipped_step_leaves_params_and_optimizer_state_unchanged(config):
    config.train.nonfinite = "skip"
    tokenizer = Tokenizer.load(config.data.tokenizer.path)
    setup = build(with_vocab(config, tokenizer))
    state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)
    poisoned = jax.device_put(state.replace(params=jax.tree.map(
        lambda x: x.at[0].set(jnp.inf), state.params)), setup.state_shardings)
    before = jax.device_get(poisoned)
    batch = next(pipeline.train_batches(config.data, tokenizer, setup.batch_sharding))
    after, metrics = setup.train_step()(poisoned, batch)
    assert int(metrics["nonfinite"]) == 1 and int(after.step) == 1
    same = jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True),
                        (before.params, before.opt_state), jax.device_get(
                            (after.params, after.opt_state)))
    assert all(jax.tree.leaves(same))


def test_workdir_guard(config, tmp_path, capsys):
    cfg = config_file(config, tmp_path)
    (tmp_path / "file").write_text("")
    for bad in ("file", "file/run"):
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(["--config", str(cfg), "--workdir", str(tmp_path / bad)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in err and "is a file" in err, err

    # two runs started at once on a new workdir: one trains, the other stops at the lock
    runs = [start(cfg, tmp_path / "shared") for _ in range(2)]
    results = [(p.wait(timeout=300), finish(p)[1]) for p in runs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2).strip().splitlines()[-1]
    assert refused.startswith(f"error: --workdir {tmp_path / 'shared'} is in use by another "
                              "run (pid "), refused
    assert [r["step"] for r in train_records(tmp_path / "shared")] == list(range(2, 9, 2))


def test_resume_refuses_unsafe_config_changes_and_records_safe_ones(config, tmp_path):
    config.train.update(steps=8, log_every=1)
    train(config, tmp_path, progress=False, stop_after=4)
    for key, value, shown in (("data", "batch_size", "data.batch_size: 8 -> 16"),
                              ("data", "seq_len", "data.seq_len: 32 -> 16")):
        changed = load_copy(config)
        changed[key][value] = 16
        with pytest.raises(CheckpointError, match=shown):
            train(changed, tmp_path, progress=False)
    config.opt.lr, config.eval.every = 1e-3, 2
    train(config, tmp_path, progress=False)
    record = next(r for r in read_metrics(tmp_path) if "resumed_with_changes" in r)
    assert record["step"] == 4 and json.loads(record["resumed_with_changes"]) == {
        "eval.every": [4, 2], "opt.lr": [3e-3, 1e-3]}
    assert max(losses(tmp_path)) == 8


def load_copy(config):
    return type(config)(config.to_dict())


def test_failing_save_is_a_clear_error_that_keeps_the_previous_checkpoint(config, tmp_path):
    config.train.update(steps=4)
    cfg, tmp_path = config_file(config, tmp_path), tmp_path / "run"
    train(config, tmp_path, progress=False)

    def small_files():   # root ignores permissions, not the file size limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    # a pipe, not a file, for its output: the limit would cut a file off too
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(cfg), "--workdir",
                           str(tmp_path), "--no-progress", "--config.train.steps=8"],
                          preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    last = next((line for line in err.splitlines() if line.startswith("error: ")), err[-3000:])
    # Loom's own error is one line, and the tracebacks of orbax's and tensorstore's abandoned
    # writes ("Event loop is closed", "Task exception was never retrieved") are not shown
    assert proc.returncode == 2 and "Traceback" not in err and last.startswith(
        f"error: writing the checkpoint of step 8 to {tmp_path}/checkpoints failed (File too "
        "large); the previous checkpoint (step 4) is kept"), last
    assert Checkpointer(tmp_path).steps() == [4]
    config.train.steps = 8
    train(config, tmp_path, progress=False)         # the next start resumes from step 4
    assert Checkpointer(tmp_path).steps() == [4, 8]


def test_from_hf_records_the_vocabulary_and_refuses_model_overrides(config, tmp_path, capsys):
    config.train.update(steps=2)
    train(config, tmp_path / "run", progress=False)
    hf = convert.export(tmp_path / "run", tmp_path / "hf")
    cfg = config_file(config, tmp_path)
    with pytest.raises(SystemExit):
        export_cli.main(["from-hf", "--hf", str(hf), "--workdir", str(tmp_path / "a"),
                         "--config", str(cfg), "--config.model.d_model=999"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.d_model=999 (it has 32): the imported model's shape "
                          f"comes from {hf}/config.json") and "\n" not in err, err
    run_config = convert.import_hf(hf, tmp_path / "imported", config,
                                   config_args=["--config.model.dropout=0.0"])
    imported = load(run_config)
    assert imported.data.tokenizer.fingerprint == Tokenizer.load(
        config.data.tokenizer.path).fingerprint
    writer = io.BytesIO()   # another vocabulary in the run's tokenizer.model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"line {i} of other words {i * 7}" for i in range(300)]),
        model_writer=writer, vocab_size=100, minloglevel=2, num_threads=1, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3)
    Tokenizer(writer.getvalue()).save(tmp_path / "imported" / MODEL_FILE)
    with pytest.raises(DataError, match="made with tokenizer"):
        train(imported, tmp_path / "imported", progress=False)
