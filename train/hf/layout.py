"""What a Hugging Face layout of a Loom model is: a table of tensor conversions, both ways.

A layout (Llama, GPT-2, BERT) lists `Tensor` entries, each tying one or more Loom parameters to
one or more Hugging Face tensors with a pair of exact conversions (transposes, reshapes, fusing
or splitting), so export and import share one table and a round trip is bit-identical. Loom
parameters are addressed by "/"-joined paths in the unrolled naming (`layers_3/attn/query/
kernel`), whether the model scans its layers (one `layers` subtree with a leading layer axis)
or not; `flat_unrolled` and `nest` convert between the two.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
from flax import traverse_util

from errors import CheckpointError, ConversionError, ModelConfigError
from model.config import ModelConfig

Shape = tuple[int, ...]
Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Loom parameters `loom` <-> Hugging Face tensors `hf`.

    `to_hf(loom arrays) -> hf arrays`; `to_loom(hf arrays, loom shapes) -> loom arrays`.
    `optional`: trailing `hf` names that export writes but a checkpoint may lack (a copy, such as
    T5's output layer written beside the embedding it equals); `to_loom` gets those present.
    """
    loom: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[[Arrays], Arrays]
    to_loom: Callable[[Arrays, Sequence[Shape]], Arrays]
    optional: tuple[str, ...] = ()


def same(loom: str, hf: str) -> Tensor:
    """Stored the same way on both sides (norm scales, embedding tables)."""
    return Tensor((loom,), (hf,), lambda xs: xs,
                  lambda ws, shapes: [w.reshape(s) for w, s in zip(ws, shapes)])


def flat(loom: str, hf: str) -> Tensor:
    """A Loom bias of any shape (a query bias is N x K) <-> a flat vector."""
    return Tensor((loom,), (hf,), lambda xs: [xs[0].reshape(-1)],
                  lambda ws, shapes: [ws[0].reshape(shapes[0])])


def linear(loom: str, hf: str, in_axes: int = 1) -> Tensor:
    """A Loom kernel (in..., out...) <-> a torch `nn.Linear` weight (out, in), flattened."""
    def to_hf(xs):
        x, = xs
        return [x.reshape(math.prod(x.shape[:in_axes]), -1).T]
    return Tensor((loom,), (hf,), to_hf, lambda ws, shapes: [ws[0].T.reshape(shapes[0])])


def columns(loom: Sequence[str], hf: str, in_axes: int = 1) -> Tensor:
    """Loom kernels (in..., out_i...) <-> one (in, sum of out_i) matrix, side by side: GPT-2's
    `Conv1D` weights (in_axes=1) and their biases (in_axes=0), e.g. q, k and v fused."""
    def to_hf(xs):
        rows = (math.prod(xs[0].shape[:in_axes]),) if in_axes else ()
        return [np.concatenate([x.reshape(rows + (-1,)) for x in xs], axis=-1)]

    def to_loom(ws, shapes):
        sizes = [math.prod(s[in_axes:]) for s in shapes]
        parts = np.split(ws[0], np.cumsum(sizes)[:-1], axis=-1)
        return [p.reshape(s) for p, s in zip(parts, shapes)]
    return Tensor(tuple(loom), (hf,), to_hf, to_loom)


def unstacked(loom: str, hf: Sequence[str], axis: int) -> Tensor:
    """One Loom kernel (in, parts, out) <-> one `nn.Linear` weight (out, in) per part: the fused
    SwiGLU `wi` (D, 2, F) <-> gate_proj and up_proj (F, D)."""
    def to_hf(xs):
        return [part.T for part in np.moveaxis(xs[0], axis, 0)]
    return Tensor((loom,), tuple(hf), to_hf,
                  lambda ws, shapes: [np.stack([w.T for w in ws], axis=axis)])


@dataclasses.dataclass(frozen=True)
class Layout:
    """One Hugging Face architecture for Loom models of one shape.

    `check(cfg)` raises ModelConfigError naming the model option that does not map;
    `tensors(cfg)` is the conversion table; `hf_config(cfg)` is config.json;
    `model_keys(hf_config)` are the Loom `model.*` keys of a Hugging Face config (or a
    CheckpointError naming the setting Loom lacks); `objective` is the Loom objective that
    trains it. `stacks` are the Loom param paths of scanned layer stacks. `prefix` is the base
    model's prefix of tensor names (`model.`), which checkpoints saved from the base model lack,
    `heads` the prefixes of tensors outside it, `renames` regex substitutions from older names.
    `ignored` matches Hugging Face tensors that are buffers, not parameters (precomputed masks
    and frequencies) or a tied output layer stored twice, skipped on import. `tensor_keys`
    (names of the checkpoint's tensors) -> model keys that follow from which tensors it holds
    rather than from config.json (T5: an `lm_head.weight` of its own means untied).
    """
    name: str
    model_type: str
    architecture: str
    family: str
    check: Callable[[ModelConfig], None]
    tensors: Callable[[ModelConfig], list[Tensor]]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    model_keys: Callable[[Mapping[str, Any]], dict[str, Any]]
    objective: str
    stacks: tuple[str, ...] = ("layers",)
    prefix: str = ""
    heads: tuple[str, ...] = ("lm_head.",)
    renames: tuple[tuple[str, str], ...] = ()
    ignored: str = r"$^"
    tensor_keys: Callable[[Collection[str]], dict[str, Any]] | None = None

    def canonical(self, name: str) -> str:
        """A tensor name as the task model (`...ForCausalLM`) stores it."""
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        if not self.prefix or name.startswith((self.prefix, *self.heads)):
            return name
        return self.prefix + name


def require(cfg: ModelConfig, layout: str, family: str, needs: Mapping[str, Any],
            hint: str = "") -> None:
    """ModelConfigError naming the first model option whose value `layout` cannot express."""
    if cfg.family != family:
        raise ModelConfigError(f"model.family={cfg.family!r} cannot be exported to the {layout} "
                               f"layout, which holds a model.family={family!r} model")
    for key, want in needs.items():
        if getattr(cfg, key) != want:
            raise ModelConfigError(f"model.{key}={getattr(cfg, key)!r} has no equivalent in the "
                                   f"Hugging Face {layout} layout, which needs model.{key}="
                                   f"{want!r}{hint}")


def require_plain_heads(cfg: ModelConfig, layout: str) -> None:
    """GPT-2 and BERT: one KV head per query head, head size d_model / n_heads."""
    if cfg.kv_heads != cfg.n_heads:
        raise ModelConfigError(f"model.n_kv_heads={cfg.n_kv_heads} (grouped-query attention) has "
                               f"no equivalent in the Hugging Face {layout} layout, which needs "
                               "one KV head per query head (model.n_kv_heads=0)")
    if cfg.head_size * cfg.n_heads != cfg.d_model:
        raise ModelConfigError(f"model.head_dim={cfg.head_dim} has no equivalent in the Hugging "
                               f"Face {layout} layout, whose head size is d_model / n_heads "
                               "(model.head_dim=0)")


def unsupported(hf: Mapping[str, Any], key: str, value: Any, default: Any = None) -> None:
    """ConversionError if config.json sets `key` (default `default`) to other than `value`."""
    if hf.get(key, default) != value:
        raise ConversionError(f"config.json has {key}={hf.get(key, default)!r}; Loom's model "
                              f"supports only {key}={value!r}")


def flat_unrolled(params: Mapping[str, Any], cfg: ModelConfig,
                  stacks: Sequence[str] = ("layers",)) -> dict[str, np.ndarray]:
    """{"layers_3/attn/query/kernel": array, ...}: scanned stacks (param paths such as
    "layers" or "encoder/layers") split into their layers."""
    out = {}
    for path, x in traverse_util.flatten_dict(params, sep="/").items():
        x = np.asarray(x)
        stack = next((s for s in stacks if path.startswith(s + "/")), None)
        if cfg.scan_layers and stack is not None:
            rest = path[len(stack) + 1:]
            out.update({f"{stack}_{i}/{rest}": x[i] for i in range(x.shape[0])})
        else:
            out[path] = x
    return out


def nest(flat: Mapping[str, np.ndarray], cfg: ModelConfig,
         stacks: Sequence[str] = ("layers",)) -> dict[str, Any]:
    """The inverse of `flat_unrolled`: the param tree of a model with `cfg.scan_layers`."""
    if not cfg.scan_layers:
        return traverse_util.unflatten_dict(dict(flat), sep="/")
    layered = re.compile(rf"^({'|'.join(map(re.escape, stacks))})_(\d+)/(.*)$")
    out, per_layer = {}, {}
    for path, x in flat.items():
        m = layered.match(path)
        if m:
            per_layer.setdefault(f"{m[1]}/{m[3]}", {})[int(m[2])] = x
        else:
            out[path] = x
    for path, layers in per_layer.items():
        out[path] = np.stack([layers[i] for i in range(len(layers))])
    return traverse_util.unflatten_dict(out, sep="/")


def to_hf(layout: Layout, flat: Mapping[str, np.ndarray], cfg: ModelConfig
          ) -> dict[str, np.ndarray]:
    """Hugging Face tensors of a Loom model's (flat, unrolled) parameters."""
    out, used = {}, set()
    for t in layout.tensors(cfg):
        out.update(zip(t.hf, (np.ascontiguousarray(a) for a in t.to_hf([flat[p] for p in t.loom]))))
        used.update(t.loom)
    left = sorted(set(flat) - used)
    if left:  # a Loom variant the table does not know: never export half a model
        raise ConversionError(f"the {layout.name} layout has no place for the parameters "
                              f"{left[:4]}; this model cannot be exported to it")
    return out


def to_loom(layout: Layout, hf: Mapping[str, Any], cfg: ModelConfig,
            shapes: Mapping[str, Shape], dtype: Any) -> dict[str, np.ndarray]:
    """Flat, unrolled Loom parameters (shapes as in `shapes`, cast to `dtype`) from Hugging Face
    tensors; `hf` maps names to arrays (or to callables returning them, read on demand)."""
    out, used = {}, set()
    for t in layout.tensors(cfg):
        missing = [n for n in t.hf if n not in hf and n not in t.optional]
        if missing:
            raise CheckpointError(f"the checkpoint lacks tensor {missing[0]!r}, which a "
                                  f"{layout.name} model of this config.json has")
        names = [n for n in t.hf if n in hf]
        arrays = [np.asarray(hf[n]() if callable(hf[n]) else hf[n]) for n in names]
        want = [tuple(shapes[p]) for p in t.loom]
        shapes_in = [a.shape for a in arrays]
        try:
            got = t.to_loom(arrays, want)
        except ValueError as e:    # a reshape or split the tensor's shape does not allow
            raise CheckpointError(f"tensor {t.hf[0]!r} of shape {shapes_in[0]} cannot be "
                                  f"converted to Loom's {want[0]} ({e}); the checkpoint does not "
                                  "fit the model its config.json describes") from e
        if [x.shape for x in got] != want:
            raise CheckpointError(f"tensor {t.hf[0]!r} has shape {shapes_in[0]}, which does "
                                  "not fit the model its config.json describes (Loom expects "
                                  f"{want[0]})")
        out.update(zip(t.loom, (x.astype(dtype) for x in got)))
        used.update(names)
    unused = sorted(n for n in set(hf) - used if not re.search(layout.ignored, n))
    if unused:
        raise CheckpointError(f"the checkpoint has tensors a Loom {layout.name} model does not: "
                              f"{unused[:4]}; import supports the plain {layout.architecture}")
    return out
