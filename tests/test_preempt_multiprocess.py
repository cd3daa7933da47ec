"""Two real processes form one JAX CPU cluster and train; a Ctrl-C (SIGINT) sent to process 1
alone stops both at the same step, which they checkpoint together, and both exit 0.

Run as a script, this file is one of the two processes.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax

from test_multiprocess import _free_port


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(config, tmp_path):
    config.train.update(steps=3000, log_every=1)
    config.ckpt.update(every=1000)
    config.eval.update(every=0, steps=1)
    config.mesh.update(data=2, fsdp=2)
    (tmp_path / "config.json").write_text(config.to_json())
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(PYTHONPATH=str(Path(__file__).parent.parent),   # this checkout's code
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)],
                              cwd=Path(__file__).parent.parent, env=env,
                              stdout=open(tmp_path / f"out{i}.txt", "w"),
                              stderr=subprocess.STDOUT)
             for i in range(2)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                (tmp_path / f"out{i}.txt").read_text()[-3000:] for i in range(2)]
            time.sleep(0.05)
        started = time.monotonic()
        procs[1].send_signal(signal.SIGINT)
        for p in procs:
            p.wait(timeout=120)
        print(f"2 processes: both exited {time.monotonic() - started:.1f} s after the signal")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [(tmp_path / f"out{i}.txt").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    stopped = [json.loads((tmp_path / f"stopped{i}.json").read_text()) for i in range(2)]
    assert stopped[0] == stopped[1] and stopped[0] is not None and stopped[0] < 3000
    from train.checkpoint import Checkpointer
    assert Checkpointer(tmp_path / "run").steps()[-1] == stopped[0]
    assert f"checkpointed step {stopped[0]}" in outputs[0]


def _process(index: int, port: int, workdir: Path) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=index)
    from ml_collections import ConfigDict
    from train.loop import train
    config = ConfigDict(json.loads((workdir / "config.json").read_text()))
    result = train(config, workdir / "run", progress=False)
    (workdir / f"stopped{index}.json").write_text(json.dumps(result["preempted"]))
    jax.distributed.shutdown()


if __name__ == "__main__":
    _process(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
