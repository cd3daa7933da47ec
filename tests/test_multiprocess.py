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


def _classify_config(config, tmp_path):
    """A classification run's config over real derived records (data/derived.py), its label
    map fixed, the records prepared once here so the processes only read them."""
    from data import derived
    records = [json.loads(text) for _, text in derived.documents("docstring_package")][:60]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                            for r in records))
    task = config.copy_and_resolve_references()
    task.train.objective = "classify"
    task.data.update(source="task_files", paths=(str(path),), eval_paths=(str(path),),
                     max_docs=0, batch_size=8, data_dir=str(tmp_path / "task_tfds"))
    from data.tokenizer import Tokenizer
    from train.finetune import backbone
    from train.setup import with_vocab
    task = backbone.resolve(task, tmp_path / "classify_run")   # layout, labels: as the loop does
    return with_vocab(task, Tokenizer.load(task.data.tokenizer.path))


def _predict(task_config, devices=None):
    """Predictions of a freshly initialised classifier (seed 0) on the task's first records."""
    from model.sharding import activate
    from train import state as state_lib
    from train.finetune import predict
    from train.setup import build
    from data.tokenizer import Tokenizer
    if devices is not None:
        task_config.mesh.update(data=len(devices), fsdp=1, tensor=1)
    setup = build(task_config, devices)
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)
        found = predict.records(setup, task_config.data.eval_split, 20)
        return predict.predict(setup, state.params,
                               Tokenizer.load(task_config.data.tokenizer.path), found)


def _generate(lm_config, devices=None):
    """Greedy text of a freshly initialised decoder (seed 0) for two prompts."""
    from data.tokenizer import Tokenizer
    from model.sharding import activate
    from train import state as state_lib
    from train.decoding import generate
    from train.decoding.options import Options
    from train.setup import build, with_vocab
    import jax
    tokenizer = Tokenizer.load(lm_config.data.tokenizer.path)
    lm_config = with_vocab(lm_config, tokenizer)
    lm_config.mesh.update(data=len(devices) if devices else -1, fsdp=1, tensor=1)
    setup = build(lm_config, devices)
    with activate(setup.mesh, setup.rules):
        state = state_lib.init(setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)
        return generate.generate_text(setup.model_cfg, state.params, tokenizer,
                                      ["def main(", "import os"], max_new_tokens=6,
                                      options=Options("greedy"), rng=jax.random.PRNGKey(0))


def test_two_processes_assemble_the_global_batch_from_their_shards(config, tmp_path):
    from data import pipeline
    from data.tokenizer import Tokenizer
    config.data.update(batch_size=8, interleave=4, shuffle_window=16)
    (tmp_path / "config.json").write_text(config.to_json())
    task = _classify_config(config, tmp_path)
    (tmp_path / "classify.json").write_text(task.to_json())
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
    # generation and task predictions (what the task metrics are computed from) are the
    # same on both processes as in one process
    import jax
    texts = _generate(config, jax.devices()[:1])
    for index in range(2):
        assert json.loads((tmp_path / f"generated{index}.json").read_text()) == texts
    one = _predict(task, jax.devices()[:1])
    for index in range(2):
        seen = json.loads((tmp_path / f"predictions{index}.json").read_text())
        assert [p["prediction"] for p in seen] == [p["prediction"] for p in one]
        np.testing.assert_allclose([p["score"] for p in seen], [p["score"] for p in one],
                                   rtol=1e-5)
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
    task = ConfigDict(json.loads((workdir / "classify.json").read_text()))
    task.mesh.update(data=-1, fsdp=1, tensor=1)   # 4 devices over the 2 processes
    (workdir / f"predictions{index}.json").write_text(json.dumps(_predict(task)))
    (workdir / f"generated{index}.json").write_text(json.dumps(_generate(config)))
    if index == 0:
        (workdir / "process0.json").write_text(json.dumps({
            "process_count": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count()}))
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    _process(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
