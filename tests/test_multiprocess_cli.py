"""Real multi-process training launched through the CLI flags, as on a cluster: N processes of
`python -m train --coordinator 127.0.0.1:PORT --num-processes N --process-id I` (2 fake CPU
devices each, gloo collectives) train on the test corpus, checkpoint, are all killed with
SIGKILL after a checkpoint, and are started again; every logged step's loss equals what one
process computes over the same global batches on a mesh of the same shape, and a single
process restores the checkpoint they wrote together.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
STEPS, CKPT_EVERY = 16, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n, config_file, workdir, logs):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.path.join(
                   tempfile.gettempdir(), f"loom-test-xla-cache-{os.getuid()}"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = []
    for i in range(n):
        out = open(logs / f"process{i}.{len(list(logs.iterdir()))}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "train", "--config", str(config_file), "--workdir",
             str(workdir), "--no-progress", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", str(n), "--process-id", str(i)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _records(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by the kill
            pass
    return out


def _logs(logs):
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.iterdir()))


def _reference_losses(config, n):
    """One process, 2n devices, the same mesh shape, fed the n processes' shares joined."""
    from data import pipeline
    from data.tokenizer import Tokenizer
    from model.sharding import activate
    from train import state as state_lib
    from train.setup import build, with_vocab
    tokenizer = Tokenizer.load(config.data.tokenizer.path)
    config = with_vocab(config, tokenizer)
    setup = build(config, jax.devices()[:2 * n])
    shares = [iter(pipeline.local_batches(
        config.data, tokenizer, "train", local_batch=config.data.batch_size // n, shuffle=True,
        num_epochs=None, process_index=i, process_count=n)) for i in range(n)]
    losses = []
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings,
                               config.train.seed)
        step = setup.train_step()
        for _ in range(STEPS):
            parts = [dict(next(s)) for s in shares]
            batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]),
                                       setup.batch_sharding)
                     for k in parts[0] if k != "epoch"}
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


# 2 processes: fsdp across them, sequence parallelism within each; 4: data x fsdp across them,
# tensor parallelism within each
@pytest.mark.parametrize("n, mesh", [(2, dict(data=1, fsdp=2, sequence=2, tensor=1)),
                                     (4, dict(data=2, fsdp=2, sequence=1, tensor=2))])
def test_cli_processes_killed_after_a_checkpoint_resume_and_match_one_process(
        config, tmp_path, n, mesh):
    config.mesh.update(mesh)
    tokenizer = config.data.tokenizer.path
    if n == 2:    # the vocabulary is trained by process 0 and read by process 1
        config.data.tokenizer.path = ""
    config.train.update(steps=STEPS, log_every=1)
    config.eval.update(every=0, steps=1)
    config.ckpt.update(every=CKPT_EVERY, keep=2)
    config_file = tmp_path / "config.py"
    config_file.write_text("import json\nfrom ml_collections import ConfigDict\n\n\n"
                           "def get_config():\n"
                           f"    return ConfigDict(json.loads({config.to_json()!r}))\n")
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()

    # first start: wait for a checkpoint and two more logged steps, then kill -9 everyone
    procs = _launch(n, config_file, workdir, logs)
    deadline = time.monotonic() + 240
    while True:
        steps = [r["step"] for r in _records(workdir) if "loss" in r and "split" not in r]
        if (workdir / "checkpoints" / str(CKPT_EVERY)).is_dir() and steps and \
                max(steps) >= CKPT_EVERY + 2:
            break
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"the {n}-process run ended or hung before its first checkpoint\n"
                        + _logs(logs))
        time.sleep(0.02)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    assert [p.wait() for p in procs] == [-signal.SIGKILL] * n
    killed_at = max(r["step"] for r in _records(workdir) if "loss" in r)
    saved = max(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert killed_at < STEPS, "the run finished before it was killed"

    # second start: resumes from the last complete checkpoint and finishes
    procs = _launch(n, config_file, workdir, logs)
    try:
        codes = [p.wait(timeout=240) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the resumed {n}-process run hung\n" + _logs(logs))
    assert codes == [0] * n, _logs(logs)

    records = _records(workdir)
    logged: dict[int, list[float]] = {}
    for r in records:
        if "loss" in r and "split" not in r and r["step"] > 0:
            logged.setdefault(r["step"], []).append(r["loss"])
    assert sorted(logged) == list(range(1, STEPS + 1))
    # the steps logged after the last checkpoint were trained again, with the same losses
    assert all(len(logged[s]) == 2 for s in range(saved + 1, killed_at + 1)), logged
    assert all(len(set(v)) == 1 for v in logged.values()), logged
    config.data.tokenizer.path = str(workdir / "tokenizer.model") if n == 2 else tokenizer
    reference = _reference_losses(config, n)
    losses = [logged[s][-1] for s in range(1, STEPS + 1)]
    np.testing.assert_allclose(losses, reference, rtol=2e-6)
    print(f"\n{n} processes: killed after step {killed_at}, resumed from checkpoint {saved}; "
          f"largest relative difference from one process "
          f"{max(abs(a - b) / abs(b) for a, b in zip(losses, reference)):.2e}; losses {losses}")
    assert [r["step"] for r in records if r.get("split") == "eval"] == [STEPS]
    # process 0 alone wrote the run's logs and printed its metrics
    assert sum(1 for r in records if r.get("params")) == 1
    outputs = sorted(logs.iterdir())
    assert all("[train/step" not in p.read_text() for p in outputs if not
               p.name.startswith("process0."))
    assert any("[train/step" in p.read_text() for p in outputs if p.name.startswith("process0."))

    # the checkpoint the processes wrote together restores in one process
    from train.restore import restore
    restored = restore(workdir, "latest")
    assert restored.step == STEPS


def test_cluster_flags_and_environment():
    from errors import ConfigError
    from train import distributed

    def cluster(flags=None, env=None):
        import argparse
        args = argparse.Namespace(**{"coordinator": None, "num_processes": None,
                                     "process_id": None, **(flags or {})})
        return distributed.from_args(args, env or {})

    assert cluster() == distributed.Cluster()           # nothing given: auto-detection decides
    assert cluster({"coordinator": "10.0.0.1:1234", "num_processes": "4", "process_id": "3"}) \
        == distributed.Cluster("10.0.0.1:1234", 4, 3)
    # a flag wins over its environment variable; the variables complete the flags
    env = {"LOOM_COORDINATOR": "h:9", "LOOM_NUM_PROCESSES": "2", "LOOM_PROCESS_ID": "0"}
    assert cluster({"process_id": "1"}, env) == distributed.Cluster("h:9", 2, 1)
    assert cluster({"num_processes": "1"}) == distributed.Cluster(None, 1, 0)   # forced alone
    for flags, env, message in [
            ({"num_processes": "4"}, {}, "--num-processes=4 needs --coordinator and --process-id"),
            ({}, {"LOOM_COORDINATOR": "h:1"}, "LOOM_COORDINATOR=h:1 needs --num-processes"),
            ({"coordinator": "h:1", "num_processes": "2", "process_id": "2"}, {},
             "--process-id=2 with --num-processes=2: process ids run from 0 to 1"),
            ({"coordinator": "h", "num_processes": "2", "process_id": "0"}, {},
             "expected HOST:PORT"),
            ({"coordinator": "h:1", "num_processes": "two", "process_id": "0"}, {},
             "--num-processes='two': expected an integer")]:
        with pytest.raises(ConfigError, match=message):
            cluster(flags, env)


def test_single_process_environments_never_wait_for_a_coordinator(monkeypatch):
    """A plain machine, and a SLURM step of one task, run alone without jax.distributed."""
    from train import distributed
    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                "LOOM_COORDINATOR", "LOOM_NUM_PROCESSES", "LOOM_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detected_environment() is None
    assert distributed.initialize() == 1
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for var, value in (("SLURM_STEP_NODELIST", "node1"), ("SLURM_NTASKS", "1"),
                       ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(var, value)
    assert distributed.detected_environment() == ("SlurmCluster", 1)
    assert distributed.initialize() == 1 and not jax.distributed.is_initialized()


def test_bad_cluster_flags_are_one_line_from_the_cli():
    out = subprocess.run([sys.executable, "-m", "train", "--config", "configs/quickstart.py",
                          "--workdir", "unused", "--num-processes", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: --num-processes=2 needs --coordinator and --process-id")
