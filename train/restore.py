"""A trained run, restored for evaluation, decoding or export onto whatever devices are present.

The checkpoint's own resolved config rebuilds the model; the mesh is chosen here (default: every
device on the data axis), so a run trained on 8 devices restores onto 1 and vice versa.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
from ml_collections import ConfigDict

from configs.base import get_config as base_config
from configs.loader import apply_overrides
from data.tokenizer import MODEL_FILE, Tokenizer, check_tokenizer
from errors import CheckpointError
from model.sharding import activate
from train import lora, state as state_lib
from train.checkpoint import Checkpointer
from train.config import validate
from train.setup import Setup, build


@dataclasses.dataclass
class Restored:
    setup: Setup            # model, mesh, shardings for the current devices
    params: Any             # sharded on setup.mesh
    tokenizer: Tokenizer
    step: int
    workdir: Path

    @property
    def config(self) -> ConfigDict:
        return self.setup.config


def saved_config(workdir: str | Path, step: str | int = "latest") -> tuple[ConfigDict, int]:
    """The resolved config a checkpoint was saved with, and the step it resolved to."""
    ckpt = Checkpointer(workdir, read_only=True)
    resolved = ckpt.resolve(step)
    return with_defaults(ckpt.restore_config(resolved)), resolved


def with_defaults(saved: Mapping[str, Any]) -> ConfigDict:
    """A saved config with the keys added since it was saved at their configs/base.py
    defaults (which keep the behaviour the run had)."""
    def merge(base: dict, over: Mapping[str, Any]) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(base.get(k), dict) and \
                isinstance(v, Mapping) else v
        return out
    return ConfigDict(merge(base_config().to_dict(), saved))


def restore(workdir: str | Path, step: str | int = "latest", *,
            overrides: Mapping[str, Any] | None = None, config_args: Sequence[str] = (),
            devices: Sequence[jax.Device] | None = None, merge_lora: bool = True) -> Restored:
    """Params of `workdir` at `step` ('latest', 'best' or a number) on a mesh over `devices`.

    `overrides` maps dotted config keys to values (e.g. {"mesh.tensor": 2, "data.batch_size":
    8}), `config_args` are command-line overrides (["--config.data.eval_split=train"]); model
    keys cannot change, since they define the parameters. A LoRA run comes back merged (a plain
    model, finetune.mode=full) unless `merge_lora=False`: then its LoraModel and params["lora"].
    """
    workdir = Path(workdir).expanduser()
    config, resolved = saved_config(workdir, step)
    config.mesh.update(data=-1, fsdp=1, sequence=1, tensor=1)
    for key, value in (overrides or {}).items():
        if key.startswith("model."):
            raise CheckpointError(f"{key} cannot be changed when restoring: the checkpoint's "
                                  "parameters define the model")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    if any(a.startswith("--config.model.") for a in config_args):
        raise CheckpointError("--config.model.* cannot be changed when restoring: the "
                              "checkpoint's parameters define the model")
    validate(apply_overrides(config, config_args), devices)
    tokenizer_path = workdir / MODEL_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path} is missing; a run directory keeps its "
                              "vocabulary there")
    tokenizer = Tokenizer.load(tokenizer_path)
    check_tokenizer(tokenizer, config.data.tokenizer.get("fingerprint", ""),
                    f"the checkpoint at step {resolved}")
    setup = build(config, devices)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            _param_shapes(setup), setup.state_shardings.params)
    params = Checkpointer(workdir, read_only=True).restore_params(resolved, abstract)
    if config.finetune.mode == "lora" and merge_lora:   # adapters merged: the plain model
        params = lora.merge(params, config.finetune.lora_alpha / config.finetune.lora_rank)
        config.finetune.mode = "full"
        setup = build(config, devices)
    return Restored(setup=setup, params=params, tokenizer=tokenizer, step=resolved,
                    workdir=workdir)


def _param_shapes(setup: Setup) -> Any:
    with activate(setup.mesh, setup.rules):
        return jax.eval_shape(lambda: state_lib.init(
            setup.model, setup.model_cfg, setup.tx, setup.state_shardings, 0)).params
