"""LoRA (Hu et al. 2021): low-rank adapters on the projection kernels of a frozen model.

`finetune.mode=lora` wraps the model in `LoraModel`: its params are the model's plus "lora",
holding for each target kernel W (by name: finetune.lora_targets, e.g. query, value, wo) a pair
A [..., in, r] (normal init) and B [r, out...] (zeros, so training starts at the backbone).
Every call runs each adapted projection as the frozen product plus a separate low-rank branch,
y = x W (+ bias) + (alpha / r) * dropout(x) A B, with dropout rate finetune.lora_dropout in
training only (`train=True`): W is never rebuilt, and gradients reach A and B through the branch
alone. How: `apply` puts each pair next to its kernel (params[...]["query"]["lora_a"/"lora_b"]),
so `nn.scan` slices a scanned stack's pairs per block like the kernels, and a Flax method
interceptor adds the branch to the output of every `model.layers.Dense` that holds a pair. The
optimizer trains "lora" and the task head alone (train/layerwise.py): the backbone gets no
optimizer state. With `nn.scan` stacks A and B keep the leading layer axis, one adapter per block.

`merge` folds the adapters into the kernels (W + (alpha / r) A B) and drops them: what export,
generation and evaluation of a restored run use (train/restore.py), with finetune.mode set back
to full. Without dropout (or with `train=False`) the branch forward equals the merged model's up
to float rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.layers import Dense
from model.wrapper import ModelWrapper
from model.sharding import unboxed

KEY = "lora"
SEP = "/"


def _in_axes(names: Sequence[str | None]) -> int:
    """How many leading (non-layer) kernel axes are inputs: attention's output projection reads
    heads x head_dim, every other projection one axis."""
    return 2 if tuple(names[:2]) == ("heads", "head_dim") else 1


def _targets(boxed: Any, targets: Sequence[str]) -> dict[str, nn.Partitioned]:
    """path -> boxed kernel, for every kernel whose module name is a target."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1] == "kernel" and len(keys) > 1 and keys[-2] in targets and \
                isinstance(leaf, nn.Partitioned):
            found[SEP.join(keys)] = leaf
    return found


@dataclasses.dataclass(frozen=True)
class LoraModel(ModelWrapper):
    """The model of a LoRA run: `init` and `apply` as a Flax module's (what the train state,
    the steps and the objectives use), with the adapters in params["lora"]."""
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    def init(self, rng, *args, **kwargs):
        variables = self.inner.init(rng, *args, **kwargs)
        params = dict(variables["params"])
        found = _targets(params, self.targets)
        if not found:
            from errors import ConfigError
            raise ConfigError(f"finetune.lora_targets={self.targets} name no projection of this "
                              "model; use module names such as query, key, value, out, wi, wo")
        adapters = {}
        for i, (path, kernel) in enumerate(sorted(found.items())):
            names = tuple(kernel.names)
            lead = 1 if names[0] == "layers" else 0
            n_in = _in_axes(names[lead:])
            shape = kernel.value.shape
            a_shape = shape[:lead + n_in] + (self.rank,)
            b_shape = shape[:lead] + (self.rank,) + shape[lead + n_in:]
            a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, kernel.value.dtype) / \
                jnp.sqrt(jnp.prod(jnp.array(shape[lead:lead + n_in])).astype(jnp.float32))
            adapters[path] = {   # boxed like the kernel: logical names, the rank unnamed
                "a": kernel.replace(value=a.astype(kernel.value.dtype),
                                    names=names[:lead + n_in] + (None,)),
                "b": kernel.replace(value=jnp.zeros(b_shape, kernel.value.dtype),
                                    names=names[:lead] + (None,) + names[lead + n_in:])}
        params[KEY] = adapters
        return {**variables, "params": params}

    def apply(self, variables, *args, **kwargs):
        params = with_pairs(variables["params"])
        branch = _branch(self.alpha / self.rank, self.dropout if kwargs.get("train") else 0.0)
        with nn.intercept_methods(branch):
            return self.inner.apply({**variables, "params": params}, *args, **kwargs)


A_NAME, B_NAME = "lora_a", "lora_b"


def _set_path(tree, keys, fn):
    if len(keys) == 1:
        return {**tree, keys[0]: fn(tree[keys[0]])}
    return {**tree, keys[0]: _set_path(tree[keys[0]], keys[1:], fn)}


def with_pairs(params: Any) -> Any:
    """The params without "lora", each pair moved next to its kernel as lora_a / lora_b."""
    if KEY not in params:
        return params
    params = dict(params)
    for path, ab in params.pop(KEY).items():
        keys = path.split(SEP)
        params = _set_path(params, keys[:-1], lambda module: {
            **module, A_NAME: unboxed(ab["a"]), B_NAME: unboxed(ab["b"])})
    return params


def _branch(scale: float, rate: float):
    """The interceptor: a Dense call whose module holds a pair returns x W + scale *
    dropout(x) A B (per output slice with `split`)."""
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, Dense) and context.method_name == "__call__"
                and module.has_variable("params", A_NAME)):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        (x,) = args
        a = module.get_variable("params", A_NAME).astype(module.dtype)
        b = module.get_variable("params", B_NAME).astype(module.dtype)
        x = x.astype(module.dtype)
        if rate > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(module.dtype)
        axis = tuple(i % x.ndim for i in module.axis)
        xa = jax.lax.dot_general(x, a, ((axis, tuple(range(len(axis)))), ((), ())))
        delta = jnp.tensordot(xa, b, axes=([xa.ndim - 1], [0])) * jnp.asarray(scale, module.dtype)
        if not module.split:
            return y + delta.astype(y.dtype)
        out_axis = xa.ndim - 1     # the first output feature axis: one output per index
        return tuple(yi + jnp.take(delta, i, axis=out_axis).astype(yi.dtype)
                     for i, yi in enumerate(y))
    return intercept


def _delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B over the rank axis. A scanned stack's pair has a leading layer axis on both (and
    then both have at least 3 axes, which an unscanned pair never has)."""
    if a.ndim >= 3 and b.ndim >= 3:
        return jax.vmap(_delta)(a, b)
    return jnp.tensordot(a, b, axes=([a.ndim - 1], [0]))


def merge(params: Any, scale: float) -> Any:
    """The params without "lora", each adapted kernel replaced by W + scale * A @ B."""
    if KEY not in params:
        return params
    params = dict(params)
    adapters = params.pop(KEY)
    for path, ab in adapters.items():
        a, b = unboxed(ab["a"]), unboxed(ab["b"])
        params = _set_path(params, path.split(SEP), lambda w: (
            w + scale * _delta(a, b).astype(w.dtype)).astype(w.dtype))
    return params


def is_adapter(path) -> bool:
    keys = [str(getattr(k, "key", k)) for k in path]
    return bool(keys) and keys[0] == KEY
