"""Two real processes on this machine form one JAX CPU cluster (gloo collectives): each reads only
its share of the documents, and the global batch they assemble with
`jax.make_array_from_process_local_data` is exactly what one process computes for both shares.

Run as a script, this file is one of the two processes.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

OBJECTIVES = ("clm", "span_corruption")
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_global_batch_from_their_shards(config, tmp_path):
    from data import pipeline
    from data.tokenizer import Tokenizer
    config.data.update(batch_size=8, interleave=4, shuffle_window=16)
    (tmp_path / "config.json").write_text(config.to_json())
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(Path(__file__).parent.parent)   # this checkout's code, not another
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)],
                              cwd=Path(__file__).parent.parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two-process cluster did not finish in 240 s")
        outputs.append(out)
        assert proc.returncode == 0, out[-3000:]

    tokenizer = Tokenizer.load(config.data.tokenizer.path)
    for objective in OBJECTIVES:
        # what each process holds is its own share, as one process computes it
        shares = []
        for index in range(2):
            batches = iter(pipeline.local_batches(
                config.data, tokenizer, "train", objective=objective, local_batch=4,
                shuffle=True, num_epochs=None, process_index=index, process_count=2))
            shares.append([next(batches) for _ in range(STEPS)])
        for step in range(STEPS):
            seen = np.load(tmp_path / f"{objective}_{step}.npz")
            for key in seen.files:
                expected = np.concatenate([shares[0][step][key], shares[1][step][key]])
                np.testing.assert_array_equal(seen[key], expected, err_msg=f"{objective} {key}")
            for index in range(2):
                local = np.load(tmp_path / f"{objective}_{step}_local{index}.npz")
                np.testing.assert_array_equal(local["inputs" if objective == "clm" else
                                                    "encoder_inputs"],
                                              shares[index][step]["inputs" if objective == "clm"
                                                                  else "encoder_inputs"])
    # the shares are disjoint and together are the whole split
    docs = [set(pipeline.document_stream(config.data, "train", shuffle=False, num_epochs=1,
                                         process_index=i, process_count=2)[1])
            for i in range(2)]
    assert not docs[0] & docs[1]
    assert docs[0] | docs[1] == set(pipeline.documents(config.data, "train"))
    report = json.loads((tmp_path / "process0.json").read_text())
    assert report == {"process_count": 2, "devices": 4, "local_devices": 2}
    # training, checkpointing and resuming across processes launched by the CLI:
    # tests/test_multiprocess_cli.py


def _process(index: int, port: int, workdir: Path) -> None:
    """One of the two processes: 2 CPU devices each, a 4-device global mesh."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=index)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from ml_collections import ConfigDict

    from data import pipeline
    from data.tokenizer import Tokenizer
    config = ConfigDict(json.loads((workdir / "config.json").read_text()))
    tokenizer = Tokenizer.load(config.data.tokenizer.path)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    for objective in OBJECTIVES:
        batches = pipeline.train_batches(config.data, tokenizer, sharding, objective=objective)
        for step in range(STEPS):
            batch = next(batches)
            local = {k: np.concatenate([np.asarray(s.data) for s in sorted(
                v.addressable_shards, key=lambda s: s.index[0].start)]) for k, v in batch.items()}
            np.savez(workdir / f"{objective}_{step}_local{index}.npz", **local)
            full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                    for k, v in batch.items()}
            if index == 0:
                np.savez(workdir / f"{objective}_{step}.npz", **full)
    if index == 0:
        (workdir / "process0.json").write_text(json.dumps({
            "process_count": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count()}))
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    _process(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
