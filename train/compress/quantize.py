"""python -m train.compress quantize: post-training quantization of a run into a new run.

    python -m train.compress quantize --workdir runs/quickstart --out runs/quickstart-int8 \\
        --weights int8 [--activations int8] [--step latest|best|N]

The new run's checkpoint holds every dense projection's kernel as int8 (or int4) values and
float32 per-output-channel scales (model/quant.py, qwix), the other params as they were; its
config says quant.mode=ptq, so `train.eval`, `train.generate` and `train.eval --choices` load
it and run the quantized matmuls. A QAT run (quant.mode=qat) quantizes into the model it
trained for: its logits match the QAT model's with the same settings.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

# the CLI's choices; train.config validates quant.* with the same tuples
WEIGHTS, ACTIVATIONS = ("int8", "int4"), ("", "int8")


def add_parser(commands) -> argparse.ArgumentParser:
    sub = commands.add_parser("quantize", help="int8/int4 post-training quantization (qwix)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--weights", required=True, help="int8 | int4")
    sub.add_argument("--activations", default="", help="'' (weights only, default) | int8: "
                     "the projections' inputs too (int8 x int8 matmuls)")
    sub.add_argument("--calibration-batches", type=int, default=0, metavar="N",
                     help="with --activations int8: static input scales, each projection's "
                     "input absmax over N batches of the run's train split; 0 (default) = "
                     "per-token scales computed at run time")
    sub.set_defaults(run=run)
    return sub


def run(args: argparse.Namespace) -> None:
    summary = quantize_run(args.workdir, args.out, step=args.step, weights=args.weights,
                           activations=args.activations,
                           calibration_batches=args.calibration_batches)
    import jax   # deferred: --help stays fast
    if jax.process_index() == 0:
        print(f"wrote {summary['out']} (step {summary['step']}): {summary['kernels']} kernels "
              f"to {summary['weights']}{' with int8 activations' if summary['activations'] else ''}"
              f"{' (static scales from %d batches)' % summary['calibration_batches'] if summary['calibration_batches'] else ''}"
              f"; params {summary['float_bytes']:,} -> {summary['quantized_bytes']:,} bytes")


def _check_out(out: Path) -> None:
    from errors import ConfigError
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory; choose a "
                          "new directory for the quantized run")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {out}: {parent} is a file, not a directory")


def param_bytes(params: Any) -> int:
    """Bytes the params take on device (int4 counted at half a byte, as it is packed there)."""
    import jax
    import jax.numpy as jnp
    return sum((x.size + 1) // 2 if x.dtype == jnp.int4 else x.size * x.dtype.itemsize
               for x in jax.tree.leaves(params))


def quantize_run(workdir: str | Path, out: str | Path, *, step: str | int = "latest",
                 weights: str = "int8", activations: str = "",
                 calibration_batches: int = 0) -> dict[str, Any]:
    """Writes the post-training quantization of `workdir` at `step` to the new run `out`;
    returns what it did (step, kernels quantized, param bytes before and after). With
    `calibration_batches` the int8 activations get static scales from that many batches of the
    run's train split (one device: the recorder's callbacks then report each call once)."""
    import itertools

    import jax
    from ml_collections import ConfigDict

    from data import pipeline
    from data.tokenizer import MODEL_FILE
    from errors import ConfigError
    from model import quant
    from model.sharding import activate
    from train import families, state as state_lib
    from train.checkpoint import Checkpointer
    from train.restore import restore, saved_config
    from train.setup import build

    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if activations not in ACTIVATIONS:
        raise ConfigError(f"--activations {activations!r}: choose int8, or leave it out "
                          "(weights only)")
    if calibration_batches < 0 or (calibration_batches and not activations):
        raise ConfigError(f"--calibration-batches {calibration_batches}: give N >= 1 together "
                          "with --activations int8 (weights need no calibration)")
    workdir, out = Path(workdir).expanduser(), Path(out).expanduser()
    _check_out(out)
    saved, _ = saved_config(workdir, step)
    if saved.quant.mode == "ptq":
        raise ConfigError(f"{workdir} is already quantized ({saved.quant.weights} weights); "
                          "quantize the float run it came from instead")
    devices = jax.local_devices()[:1]   # a run directory restores onto any mesh later
    float_run = restore(workdir, step, devices=devices)
    setup = float_run.setup
    inner = getattr(setup.model, "inner", setup.model)   # a QAT run's model without qwix
    n_inputs = quant.dense_inputs(inner, *families.init_inputs(setup.model_cfg, model=inner))
    scales = None
    if calibration_batches:
        data_cfg = float_run.config.data
        batches = pipeline.eval_batches(data_cfg, float_run.tokenizer, setup.batch_sharding,
                                        data_cfg.train_split,
                                        objective=float_run.config.train.objective)
        with activate(setup.mesh, setup.rules), quant.InputRecorder() as recorder:
            eval_step = setup.eval_step()
            for batch in itertools.islice(batches, calibration_batches):
                jax.block_until_ready(eval_step(float_run.params, batch))
            jax.effects_barrier()
        scales = recorder.scales(float_run.params, n_inputs, activations)

    config = ConfigDict(float_run.config.to_dict())
    config.quant.update(mode="ptq", weights=weights, activations=activations,
                        calibration_batches=calibration_batches)
    q_setup = build(config, devices)

    def convert(p, scales):
        q = quant.quantize_params(p, n_inputs, weights)
        return q if scales is None else quant.with_input_scales(q, scales)

    with activate(q_setup.mesh, q_setup.rules):
        params = jax.jit(convert, out_shardings=q_setup.state_shardings.params)(
            float_run.params, scales)
        progress = jax.eval_shape(lambda: state_lib.init(
            q_setup.model, q_setup.model_cfg, q_setup.tx, q_setup.state_shardings, 0))
        state = state_lib.TrainState(
            step=jax.numpy.asarray(float_run.step, jax.numpy.int32), params=params,
            # inference only: no optimizer moments (orbax needs an item, so one byte)
            opt_state={"none": jax.numpy.zeros((), jax.numpy.int8)}, rng=jax.numpy.zeros(progress.rng.shape, progress.rng.dtype))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(workdir / MODEL_FILE, out / MODEL_FILE)
    ckpt = Checkpointer(out, config.ckpt)
    ckpt.save(float_run.step, state, config=config.to_dict())
    ckpt.wait()
    ckpt.close()
    return {"out": out, "step": float_run.step, "weights": weights, "activations": activations,
            "calibration_batches": calibration_batches,
            "kernels": len(n_inputs), "float_bytes": param_bytes(float_run.params),
            "quantized_bytes": param_bytes(params)}
