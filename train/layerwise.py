"""Fine-tuning modes as optimizer transforms: frozen backbones, unfreezing schedules and
layer-wise learning-rate decay.

Every parameter has a depth: 0 for the embeddings (token, position, type), l + 1 for block l of
a stack, and L (the number of blocks; encoder stack below decoder stack) for what sits above the
blocks (final norms, LM heads). A task head (params under "head") is not part of the backbone.
With `nn.scan` stacks a block's parameters are one slice of a leaf's leading "layers" axis, so
depths, scales and gates are arrays over that axis rather than one number per leaf.

- frozen (and lora / prompt, which train their adapters / soft prompt with the head): backbone
  leaves are `optax.set_to_zero()` in an `optax.multi_transform`, so they get
  no optimizer state at all (the head's AdamW sees only the head).
- unfreeze_after=N: backbone updates are multiplied by 0 before step N, by 1 from then on.
- unfreeze_every=K: a leaf of depth d trains from step (L - d + 1) * K: the top block and the
  final norm at K, one more block below every K steps, the embeddings last; the head from 0.
- layer_lr_decay=g: updates of depth d are scaled by g^(L - d) (the learning rate's factor, so
  weight decay scales with it as in AdamW), the head and the top by 1.

Before a leaf unfreezes its AdamW moments see its gradients but its update is exactly zero, so
its value stays bit-identical.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

EMBEDDINGS = {"embed", "embeddings", "pos", "type_embed"}
# top-level params that train in the frozen modes: the task head, LoRA adapters, a soft prompt
TRAINED_WHEN_FROZEN = ("head", "lora", "prompt")
_UNROLLED = re.compile(r"^layers_(\d+)$")


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _stack(path) -> tuple[str, int | None] | None:
    """(stack prefix, block index or None for a scanned leaf) of a leaf inside a stack."""
    keys = _keys(path)
    for i, key in enumerate(keys):
        if key == "layers":
            return "/".join(keys[:i]), None
        m = _UNROLLED.match(key)
        if m:
            return "/".join(keys[:i]), int(m.group(1))
    return None


def is_head(path) -> bool:
    """A task head's leaf (or a LoRA adapter's: neither is part of the backbone's depth)."""
    keys = _keys(path)
    return bool(keys) and keys[0] in TRAINED_WHEN_FROZEN


def _stack_sizes(tree: Any) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        found = _stack(path)
        if found:
            prefix, index = found
            n = leaf.shape[0] if index is None else index + 1
            sizes[prefix] = max(sizes.get(prefix, 0), n)
    return sizes


def depths(tree: Any) -> tuple[Any, int]:
    """Per leaf: its depth (an int, or an int array over a scanned leaf's layer axis, shaped
    to broadcast), or None for the head; and L, the blocks of all stacks."""
    sizes = _stack_sizes(tree)
    order = sorted(sizes, key=lambda p: ("decoder" in p.split("/"), p))   # decoder on top
    offsets, total = {}, 0
    for prefix in order:
        offsets[prefix] = total
        total += sizes[prefix]

    def one(path, leaf):
        if is_head(path):
            return None
        found = _stack(path)
        if found:
            prefix, index = found
            if index is None:
                d = offsets[prefix] + 1 + np.arange(leaf.shape[0])
                return d.reshape((-1,) + (1,) * (leaf.ndim - 1))
            return offsets[prefix] + 1 + index
        return 0 if EMBEDDINGS & set(_keys(path)) else total

    return jax.tree_util.tree_map_with_path(one, tree), total


class _StepState(NamedTuple):
    count: jax.Array


def by_depth(unfreeze_after: int, unfreeze_every: int, decay: float
             ) -> optax.GradientTransformation:
    """Scales each update by its depth's LR factor and unfreezing gate (see module docstring)."""
    def init(params):
        return _StepState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        depth_tree, total = depths(updates)

        def scale(u, d):
            if d is None:
                return u
            factor = np.asarray(decay, np.float32) ** (total - np.asarray(d, np.float32))
            if unfreeze_after:
                threshold = np.full(np.shape(d), unfreeze_after)
            elif unfreeze_every:
                threshold = (total - np.asarray(d) + 1) * unfreeze_every
            else:
                threshold = np.zeros(np.shape(d))
            gate = (state.count >= jnp.asarray(threshold, jnp.int32)).astype(u.dtype)
            return u * (jnp.asarray(factor, u.dtype) * gate)

        scaled = jax.tree.map(scale, updates, depth_tree, is_leaf=lambda x: x is None)
        return scaled, _StepState(state.count + 1)

    return optax.GradientTransformation(init, update)


def trainable_labels(params: Any) -> Any:
    """"train" for TRAINED_WHEN_FROZEN, "frozen" for the backbone."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if is_head(path) else "frozen", params)


def finetune_transform(tx: optax.GradientTransformation, ft: Mapping[str, Any]
                       ) -> optax.GradientTransformation:
    """`tx` under the mode of a `finetune` config section."""
    if ft["mode"] in ("frozen", "lora", "prompt"):
        return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                     trainable_labels)
    if ft["unfreeze_after"] or ft["unfreeze_every"] or ft["layer_lr_decay"] != 1.0:
        return optax.chain(tx, by_depth(ft["unfreeze_after"], ft["unfreeze_every"],
                                        ft["layer_lr_decay"]))
    return tx
