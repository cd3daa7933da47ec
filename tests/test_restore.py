"""A checkpoint restores onto a different mesh and gives the same eval loss there."""
import jax
import numpy as np

from data import pipeline
from model.sharding import activate
from train.evaluation.evaluate import evaluate
from train.loop import read_metrics, train
from train.restore import restore


def test_checkpoint_restores_onto_a_different_mesh(config, tmp_path):
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.steps = 4
    train(config, tmp_path, progress=False)
    trained_eval = [r for r in read_metrics(tmp_path) if r.get("split") == "eval"][-1]

    for devices in (jax.devices()[:1], jax.devices()[:4]):
        run = restore(tmp_path, "latest", devices=devices)
        assert run.step == 4 and run.setup.mesh.devices.size == len(devices)
        with activate(run.setup.mesh, run.setup.rules):
            batches = pipeline.eval_batches(run.config.data, run.tokenizer,
                                            run.setup.batch_sharding)
            result = evaluate(run.setup.eval_step(), run.params, batches, config.eval.steps)
        np.testing.assert_allclose(result["loss"], trained_eval["loss"], rtol=1e-5)
