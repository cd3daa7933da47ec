"""Loom checkpoints <-> Hugging Face model directories (safetensors + config.json + tokenizer);
the library behind `python -m train.export` (train/export.py).

`export` writes what `transformers` loads offline (`AutoModelForCausalLM.from_pretrained(out)`
or, for an encoder, `BertForPreTraining`, `AlbertForPreTraining` or `RobertaForMaskedLM`;
`AutoTokenizer.from_pretrained(out)`). The layout is the one the model's shape fits among its
family's `hf_layouts` (train/families.py; the tables are train/hf/decoder.py: Llama, GPT-2;
train/hf/bert.py, albert.py, roberta.py: BERT, ALBERT, RoBERTa; train/hf/t5.py: T5), or an
error naming the model
option that does not map. `import_hf` turns such a directory into a Loom run: the checkpoint's
params as step 0 of an Orbax checkpoint with a fresh optimizer state, its sentencepiece
vocabulary as the run's `tokenizer.model`, and the run's config (`config.json`, and `config.py`
to train with: `python -m train --config <workdir>/config.py --workdir <workdir>` continues
training from the imported weights).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from configs.base import get_config as base_config
from data.tokenizer import BOS, EOS, MODEL_FILE, PAD, Tokenizer
from errors import CheckpointError, ConfigError, DependencyError, ModelConfigError
from model import quant
from model.config import ModelConfig
from model.sharding import activate
from train import families, state as state_lib
from train.checkpoint import Checkpointer
from train.config import validate
from train.hf import tokenizer as hf_tokenizer
from train.hf.layout import Layout, flat_unrolled, nest, to_hf, to_loom
from train.restore import restore, saved_config
from train.setup import build

# every family's layouts, by name
LAYOUTS = {layout.name: layout for family in families.FAMILIES.values()
           for layout in family.hf_layouts}
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
RUN_CONFIG_PY = "config.py"


def _safetensors():
    try:
        import safetensors.numpy   # deferred: an optional dependency (the [hf] extra)
    except ImportError as e:
        raise DependencyError("Hugging Face export/import needs safetensors: "
                              "pip install -e '.[hf]'") from e
    return safetensors


def choose_layout(cfg: ModelConfig, name: str | None = None) -> Layout:
    """The layout `name`, or the first one `cfg` fits; a ModelConfigError says what does not map."""
    if name is not None:
        if name not in LAYOUTS:
            raise ConfigError(f"--layout {name!r}: choose one of {sorted(LAYOUTS)}")
        LAYOUTS[name].check(cfg)
        return LAYOUTS[name]
    reasons = []
    for layout in LAYOUTS.values():
        try:
            layout.check(cfg)
            return layout
        except ModelConfigError as e:
            reasons.append(f"{layout.name}: {e}")
    raise ModelConfigError("the model fits no Hugging Face layout; " + "; ".join(reasons))


# ---- export ----

def write_hf(out: str | Path, params: Any, cfg: ModelConfig, tokenizer: Tokenizer,
             layout: Layout) -> Path:
    """Writes `params` of a model of `cfg` as a Hugging Face directory `out` (new or empty).

    Everything goes to a staging directory first, so a failure never leaves half a model.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory")
    layout.check(cfg)
    tensors = to_hf(layout, flat_unrolled(jax.device_get(params), cfg, layout.stacks), cfg)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _safetensors().numpy.save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
    (staging / HF_CONFIG).write_text(json.dumps(layout.hf_config(cfg), indent=2))
    (staging / GENERATION_CONFIG).write_text(json.dumps(
        dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD), indent=2))
    hf_tokenizer.write(tokenizer, staging, cfg.max_len, bert=layout.family == "encoder",
                       eos=layout.family == "encoder_decoder")
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out


def export(workdir: str | Path, out: str | Path, step: str | int = "latest",
           layout: str | None = None, peft_adapter: str | Path | None = None) -> Path:
    """The checkpoint of `workdir` at `step` as a Hugging Face directory `out`. A LoRA run is
    exported merged; with `peft_adapter` its frozen backbone goes to `out` and its adapters to
    that directory in PEFT's format (train/hf/peft_adapter.py)."""
    config, _ = saved_config(workdir, step)
    chosen = choose_layout(ModelConfig.from_mapping(config.model), layout)  # before any restore
    if config.finetune.get("mode") == "prompt":
        raise ConfigError(f"{workdir} is a prompt-tuned run: its soft prompt has no Hugging Face "
                          "layout; export the backbone run it was tuned from (its "
                          "finetune.init_from) instead")
    if peft_adapter and config.finetune.mode != "lora":
        raise ConfigError(f"--peft-adapter: {workdir} is not a LoRA run (finetune.mode="
                          f"{config.finetune.mode}); export it without --peft-adapter")
    # Each process restores onto its own CPU device (Orbax restores on every process of a
    # cluster) and process 0 alone writes the directory.
    devices = jax.local_devices(backend="cpu")[:1]
    if peft_adapter:
        from train.hf import peft_adapter as peft_lib
        if Path(peft_adapter).expanduser().exists() and any(
                Path(peft_adapter).expanduser().iterdir()):
            raise CheckpointError(f"--peft-adapter {peft_adapter} exists and is not empty; "
                                  "choose a new directory")
        run = restore(workdir, step, devices=devices, merge_lora=False)
        if jax.process_index() != 0:
            return Path(out).expanduser()
        params = dict(run.params)
        adapters = params.pop("lora")
        path = write_hf(out, params, run.setup.model_cfg, run.tokenizer, chosen)
        peft_lib.write_adapter(peft_adapter, adapters, run.setup.model_cfg, chosen,
                               config.finetune, path.resolve())
        return path
    run = restore(workdir, step, devices=devices)
    if jax.process_index() != 0:
        return Path(out).expanduser()
    # a quantized run (train.compress quantize) goes out as float32: HF has no Loom int layout
    return write_hf(out, quant.dequantize_params(run.params), run.setup.model_cfg,
                    run.tokenizer, chosen)


# ---- import ----

def read_hf_config(hf_dir: Path) -> tuple[dict[str, Any], Layout]:
    """config.json of a Hugging Face directory and the layout of its model_type."""
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (no {HF_CONFIG}); "
                              "point --hf at the directory save_pretrained or to-hf wrote")
    try:
        hf_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    by_type = {layout.model_type: layout for layout in LAYOUTS.values()}
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type not in by_type:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; Loom imports "
                              f"{sorted(by_type)}")
    return hf_config, by_type[model_type]


def read_hf_tensors(hf_dir: Path, layout: Layout) -> dict[str, Callable[[], np.ndarray]]:
    """Canonical tensor name -> a loader of that tensor, over one or several safetensors files."""
    safetensors = _safetensors()
    if (hf_dir / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((hf_dir / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    elif (hf_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"{hf_dir} has no {WEIGHTS}; import reads safetensors weights "
                              "(save the model with save_pretrained(..., safe_serialization=True))")
    loaders = {}
    for name in files:
        try:
            handle = safetensors.safe_open(str(hf_dir / name), framework="np")
            keys = list(handle.keys())
        except Exception as e:  # the library raises its own error types for a corrupt file
            raise CheckpointError(f"{hf_dir / name} is not a readable safetensors file "
                                  f"({type(e).__name__}: {e})") from e
        loaders.update({layout.canonical(k): (lambda h=handle, k=k: h.get_tensor(k))
                        for k in keys})
    return loaders


def _unrolled_shapes(abstract_params: Any, cfg: ModelConfig, layout: Layout
                     ) -> dict[str, tuple[int, ...]]:
    flat = flat_unrolled(jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.int8), s.shape),
                                      abstract_params), cfg, layout.stacks)
    return {path: x.shape for path, x in flat.items()}


def import_hf(hf_dir: str | Path, workdir: str | Path, config: ConfigDict | None = None,
              config_args: Sequence[str] = ()) -> Path:
    """Makes `workdir` a Loom run starting from the Hugging Face model in `hf_dir`.

    Model keys come from its config.json, the vocabulary from its tokenizer.model (its
    fingerprint recorded, so a later swap of the run's tokenizer.model is refused), everything
    else from `config` (default: configs/base.py). A command-line override (`config_args`) of a
    model key that config.json determines, to another value, is an error rather than ignored.
    Returns the run's config.py.
    """
    hf_dir, workdir = Path(hf_dir).expanduser(), Path(workdir).expanduser()
    hf_config, layout = read_hf_config(hf_dir)
    tokenizer = hf_tokenizer.read(hf_dir)
    loaders = read_hf_tensors(hf_dir, layout)
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise CheckpointError(f"{workdir} already holds a training run; choose a new --workdir")

    config = ConfigDict((config or base_config()).to_dict())
    derived = {**layout.model_keys(hf_config), "family": layout.family}
    if layout.tensor_keys is not None:
        derived.update(layout.tensor_keys(set(loaders)))
    _refuse_model_overrides(config, derived, config_args, hf_dir / HF_CONFIG)
    config.model.update(derived)
    config.train.objective = layout.objective
    if families.family(layout.family).prompting is None:
        config.eval.sample_prompt = ""    # a family that writes no text prints no sample
    config.data.tokenizer.path = ""  # the run's own tokenizer.model: the checkpoint's vocabulary
    config.data.tokenizer.fingerprint = tokenizer.fingerprint
    validate(config)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise CheckpointError(f"{hf_dir}: tokenizer.model has {tokenizer.vocab_size} pieces but "
                              f"config.json has vocab_size={config.model.vocab_size}")
    setup = build(config, jax.devices("cpu")[:1])
    cfg = setup.model_cfg
    abstract = state_lib.abstract(setup.model, cfg, setup.tx, setup.state_shardings)
    flat = to_loom(layout, loaders, cfg, _unrolled_shapes(abstract.params, cfg, layout),
                   cfg.weights_dtype)
    with activate(setup.mesh, setup.rules):
        state = state_lib.from_params(nest(flat, cfg, layout.stacks), setup.tx,
                                      setup.state_shardings,
                                      config.train.seed)

    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(workdir / MODEL_FILE)
    ckpt = Checkpointer(workdir, config.ckpt)
    ckpt.save(0, state, config=config.to_dict())
    ckpt.wait()
    ckpt.close()
    (workdir / HF_CONFIG).write_text(config.to_json_best_effort(indent=2))
    run_config = workdir / RUN_CONFIG_PY
    run_config.write_text(_RUN_CONFIG.format(hf=hf_dir.absolute(), path=run_config,
                                             workdir=workdir))
    return run_config


def _refuse_model_overrides(config: ConfigDict, derived: dict[str, Any],
                            config_args: Sequence[str], source: Path) -> None:
    named = {a.split("=", 1)[0].removeprefix("--config.model.") for a in config_args
             if a.startswith("--config.model.")}
    clash = {k: v for k, v in derived.items() if k in named and config.model.get(k) != v}
    if clash:
        listed = ", ".join(f"model.{k}={config.model.get(k)!r} (it has {v!r})"
                           for k, v in clash.items())
        raise ConfigError(f"{listed}: the imported model's shape comes from {source}; drop "
                          "those --config.model overrides (training keys such as "
                          "model.dropout or model.remat may still be set)")


_RUN_CONFIG = '''"""The config of the run imported from the Hugging Face model {hf}.

It is this directory's config.json (model keys from the checkpoint's config.json). Continue
training with:  python -m train --config {path} --workdir {workdir}
"""
import json
from pathlib import Path

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(json.loads((Path(__file__).parent / "config.json").read_text()))
'''
