"""A LoRA run's adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

`python -m train.export to-hf --workdir RUN --out BASE --peft-adapter DIR` writes the frozen
backbone (the run's params without "lora", unmerged) to BASE and the adapters to DIR, so
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)` is Loom's LoRA
model: PEFT computes x W + (lora_alpha / r) * lora_B(lora_A(dropout(x))), as train/lora.py does.
Each adapted Loom kernel maps onto the Hugging Face module its kernel exports to (the layout's
`linear` / `unstacked` tensors): A (in..., r) -> lora_A.weight (r, in), B (r, out...) ->
lora_B.weight (out, r); the fused SwiGLU wi (D, 2, F) gives gate_proj and up_proj adapters that
share A. Decoder (llama layout) runs only: GPT-2's fused Conv1D q/k/v have no per-projection
module for PEFT to adapt.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from errors import ConversionError
from model.config import ModelConfig
from model.sharding import unboxed
from train import lora
from train.hf.layout import Layout, flat_unrolled

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = "/" + lora.A_NAME, "/" + lora.B_NAME


def adapter_tensors(adapters: Mapping[str, Any], cfg: ModelConfig, layout: Layout
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT tensor name -> array, and the target module names (q_proj, ...)."""
    nested = traverse_util.unflatten_dict(
        {f"{path.rsplit('/', 1)[0]}{suffix}": unboxed(ab[k]) for path, ab in adapters.items()
         for k, suffix in (("a", A_SUFFIX), ("b", B_SUFFIX))}, sep="/")
    pairs = flat_unrolled(nested, cfg, layout.stacks)
    by_kernel = {t.loom[0]: t for t in layout.tensors(cfg) if len(t.loom) == 1}
    tensors, modules = {}, set()
    for path in sorted(p for p in pairs if p.endswith(A_SUFFIX)):
        module = path[:-len(A_SUFFIX)]
        a, b = pairs[path], pairs[module + B_SUFFIX]
        tensor = by_kernel.get(module + "/kernel")
        if tensor is None or not all(h.endswith(".weight") for h in tensor.hf):
            raise ConversionError(f"the adapter on {module} has no Hugging Face module in the "
                                  f"{layout.name} layout; --peft-adapter exports projections "
                                  "(query, key, value, out, wi, wo) of the llama layout")
        rank = a.shape[-1]
        a_hf = a.reshape(-1, rank).T                                  # (r, in)
        parts = [b] if len(tensor.hf) == 1 else list(np.moveaxis(b, 1, 0))  # wi: gate, up
        for hf, part in zip(tensor.hf, parts):
            name = PREFIX + hf[:-len(".weight")]
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a_hf)
            tensors[name + ".lora_B.weight"] = np.ascontiguousarray(
                part.reshape(part.shape[0], -1).T)                     # (out, r)
            modules.add(hf[:-len(".weight")].rsplit(".", 1)[-1])
    return tensors, sorted(modules)


def write_adapter(out: str | Path, adapters: Mapping[str, Any], cfg: ModelConfig,
                  layout: Layout, finetune: Mapping[str, Any], base: str | Path) -> Path:
    """Writes the PEFT adapter directory `out` (new or empty) for the base model at `base`."""
    from safetensors.numpy import save_file   # there: write_hf has just written the base
    if layout.name != "llama":
        raise ConversionError(f"--peft-adapter exports decoder LoRA runs in the llama layout, "
                              f"not {layout.name}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--peft-adapter {out} exists and is not empty; choose a new "
                              "directory")
    tensors, modules = adapter_tensors(adapters, cfg, layout)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / ADAPTER_WEIGHTS),
                                   metadata={"format": "pt"})
    (staging / ADAPTER_CONFIG).write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base),
        r=int(finetune["lora_rank"]), lora_alpha=float(finetune["lora_alpha"]),
        lora_dropout=float(finetune["lora_dropout"]), target_modules=modules, bias="none",
        fan_in_fan_out=False, use_rslora=False, use_dora=False, modules_to_save=None,
        init_lora_weights=True, inference_mode=True), indent=2))
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out
