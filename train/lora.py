"""LoRA (Hu et al. 2021): low-rank adapters on the projection kernels of a frozen model.

`finetune.mode=lora` wraps the model in `LoraModel`: its params are the model's plus "lora",
holding for each target kernel W (by name: finetune.lora_targets, e.g. query, value, wo) a pair
A [..., in, r] (normal init) and B [r, out...] (zeros, so training starts at the backbone). Every
call runs the model on W + (alpha / r) * A @ B, the adapted weight itself, so the forward pass is
exactly the merged model's; gradients reach A and B only through that sum. The optimizer trains
"lora" and the task head alone (train/layerwise.py): the backbone gets no optimizer state.
With `nn.scan` stacks A and B keep the leading layer axis, one adapter per block.

`merge` folds the adapters into the kernels and drops them: what export, generation and
evaluation of a restored run use (train/restore.py), with finetune.mode set back to full.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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
class LoraModel:
    """The model of a LoRA run: `init` and `apply` as a Flax module's (what the train state,
    the steps and the objectives use), with the adapters in params["lora"]."""
    inner: nn.Module
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __getattr__(self, name):     # methods the objectives name (generator_logits, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def n_inputs(self):
        return getattr(self.inner, "n_inputs", None)

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
        params = merge(variables["params"], self.alpha / self.rank)
        return self.inner.apply({**variables, "params": params}, *args, **kwargs)


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

    def set_path(tree, keys, fn):
        if len(keys) == 1:
            return {**tree, keys[0]: fn(tree[keys[0]])}
        return {**tree, keys[0]: set_path(tree[keys[0]], keys[1:], fn)}

    for path, ab in adapters.items():
        a, b = unboxed(ab["a"]), unboxed(ab["b"])
        params = set_path(params, path.split(SEP), lambda w: (
            w + scale * _delta(a, b).astype(w.dtype)).astype(w.dtype))
    return params


def is_adapter(path) -> bool:
    keys = [str(getattr(k, "key", k)) for k in path]
    return bool(keys) and keys[0] == KEY
