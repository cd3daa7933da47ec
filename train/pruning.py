"""Magnitude pruning: which weights are pruned, their masks (unstructured or N:M), the cubic
schedule of gradual pruning (Zhu & Gupta 2017), and the optax transform that keeps pruned
weights exactly zero.

Pruned: the matmul kernels of the attention and MLP blocks of every layer stack (query, key,
value, out, cross-attention, wi, wo), where nearly all the compute and most of the weights of a
block are. Embeddings (a row per token: zeroing by magnitude deletes rare tokens), the LM head,
norms, biases, position tables, task heads and LoRA adapters are left dense.

N:M keeps the N largest of every M consecutive weights along a kernel's input (contraction)
dimension, flattened in row-major order for the attention output's (heads, head_dim) input: the
layout of the 2:4 sparse tensor cores (a K x N weight of y = x @ W, 2 of every 4 along K).

The masks are optimizer state (`PruneState`), created like the params they cover, so the train
state's shardings, checkpoints and resume include them with no other code. `wrap` puts the
transform around the whole optimizer: after AdamW and weight decay it turns a pruned weight's
update into minus the weight, so the new weight is exactly zero however large its moments are.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from errors import ConfigError
from model.config import ModelConfig

PRUNED_MODULES = ("attn", "cross_attn", "mlp")   # the block modules whose kernels are pruned
SCOPES = ("layer", "global")


def parse_pattern(pattern: str, key: str = "prune.pattern") -> tuple[int, int] | None:
    """'unstructured' -> None, 'N:M' -> (N, M) with 1 <= N < M; anything else a ConfigError."""
    if pattern == "unstructured":
        return None
    n, sep, m = str(pattern).partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ConfigError(f"{key}={pattern!r}: use unstructured or N:M with 0 < N < M "
                          "(e.g. 2:4)")
    return int(n), int(m)


def nm_sparsity(nm: tuple[int, int]) -> float:
    return 1 - nm[0] / nm[1]


def contraction_dims(cfg: ModelConfig) -> dict[str, int]:
    """Input width of every pruned kernel of the model: the length N:M groups run along."""
    cfgs = [cfg] + ([cfg.generator_config()] if cfg.family == "electra" else [])
    dims = {}
    for c, where in zip(cfgs, ("", "generator ")):
        dims.update({f"{where}d_model (query, key, value, wi)": c.d_model,
                     f"{where}n_heads*head_dim (attention out)": c.n_heads * c.head_size,
                     f"{where}d_ff (wo)": c.d_ff})
    return dims


def check(prune: Mapping[str, Any], model: ModelConfig) -> None:
    """The prune.* keys, against each other and the model's widths (train.config.validate)."""
    target, key = prune["target"], "prune.target"
    if not 0 <= target < 1:
        raise ConfigError(f"{key}={target}: the fraction of weights pruned must be in [0, 1) "
                          "(0 = off)")
    if prune["scope"] not in SCOPES:
        raise ConfigError(f"prune.scope={prune['scope']!r}: choose one of {SCOPES}")
    nm = parse_pattern(prune["pattern"])
    if nm is not None:
        _check_nm(nm, model, "prune.pattern")
        if target and not math.isclose(target, nm_sparsity(nm)):
            raise ConfigError(f"prune.pattern={prune['pattern']} keeps {nm[0]} of every {nm[1]}"
                              f" weights, sparsity {nm_sparsity(nm):g}; set prune.target="
                              f"{nm_sparsity(nm):g}")
    if not target:
        return
    start, end, every = prune["start"], prune["end"], prune["every"]
    if not 0 <= start <= end:
        raise ConfigError(f"prune.start={start}, prune.end={end}: need 0 <= start <= end (the "
                          "steps the sparsity ramps between)")
    if every < 1:
        raise ConfigError(f"prune.every={every}: masks are updated every K >= 1 steps")


def _check_nm(nm: tuple[int, int], model: ModelConfig, key: str) -> None:
    bad = {name: d for name, d in contraction_dims(model).items() if d % nm[1]}
    if bad:
        listed = ", ".join(f"{name}={d}" for name, d in bad.items())
        raise ConfigError(f"{key}={nm[0]}:{nm[1]} groups {nm[1]} weights along each kernel's "
                          f"input dimension, but {listed} is not divisible by {nm[1]}; choose "
                          "an M that divides it")


# ---- which leaves, and how they are laid out


class Leaf(NamedTuple):
    stacked: bool   # scanned stack: a leading "layers" axis
    n_in: int       # leading input (contraction) axes after it


def leaf_kind(path: tuple) -> Leaf | None:
    """How a parameter at `path` is pruned, or None if it stays dense."""
    keys = [str(getattr(k, "key", k)) for k in path]
    if not keys or keys[0] == "lora" or keys[-1] != "kernel" or len(keys) < 3:
        return None
    if keys[-3] not in PRUNED_MODULES or not any(k == "layers" or k.startswith("layers_")
                                                  for k in keys):
        return None
    return Leaf(stacked="layers" in keys, n_in=2 if keys[-2] == "out" else 1)


def _as_3d(x: jax.Array, leaf: Leaf) -> jax.Array:
    """A kernel as L x IN x OUT (L = 1 unstacked)."""
    lead = x.shape[:1] if leaf.stacked else (1,)
    rest = x.shape[1:] if leaf.stacked else x.shape
    return x.reshape(lead + (math.prod(rest[:leaf.n_in]), math.prod(rest[leaf.n_in:])))


def _map_pruned(fn, params: Any, *rest: Any) -> Any:
    """fn(leaf_kind, param, *rest) on pruned leaves; optax.MaskedNode() elsewhere."""
    def one(path, p, *r):
        leaf = leaf_kind(path)
        return optax.MaskedNode() if leaf is None else fn(leaf, p, *r)
    return jax.tree_util.tree_map_with_path(one, params, *rest,
                                            is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def initial_masks(params: Any) -> Any:
    """True where a pruned leaf's weight is nonzero: a backbone pruned before stays pruned."""
    return _map_pruned(lambda _, p: p != 0, params)


# ---- masks by magnitude


def magnitude_masks(params: Any, masks: Any, sparsity: jax.Array, *, nm: tuple[int, int] | None,
                    scope: str) -> Any:
    """Masks pruning a `sparsity` fraction of each pruned kernel (per layer: `scope=layer`; of
    all of them together: `global`) by |weight|, or with `nm` the N:M masks (at a sparsity
    below 1 - N/M, round(sparsity * M) pruned per group). Weights pruned before (False in
    `masks`) rank lowest, so a rising schedule never revives one."""
    scores = _map_pruned(lambda leaf, p, m: jnp.where(m, jnp.abs(p.astype(jnp.float32)), -1.0),
                         params, masks)
    if nm is not None:
        return _map_pruned(lambda leaf, s: _nm_mask(s, leaf, nm, sparsity), scores)
    if scope == "global":
        flat = jnp.concatenate([s.reshape(-1) for s in _leaf_dict(scores).values()])
        thr = _kth_smallest(flat[None], sparsity)[0]
        return _map_pruned(lambda leaf, s: s > thr, scores)
    return _map_pruned(lambda leaf, s: _layer_mask(s, leaf, sparsity), scores)


def _kth_smallest(scores_LxN: jax.Array, sparsity: jax.Array) -> jax.Array:
    """Per row, the k-th smallest score (k = round(sparsity * N)); -2 (below every score) for
    k = 0, so nothing is pruned."""
    n = scores_LxN.shape[1]
    k = jnp.round(sparsity * n).astype(jnp.int32)
    kth = jnp.sort(scores_LxN, axis=1)[:, jnp.clip(k - 1, 0, n - 1)]
    return jnp.where(k > 0, kth, -2.0)


def _layer_mask(scores: jax.Array, leaf: Leaf, sparsity: jax.Array) -> jax.Array:
    s_LxN = _as_3d(scores, leaf).reshape(scores.shape[0] if leaf.stacked else 1, -1)
    thr_L = _kth_smallest(s_LxN, sparsity)
    return (s_LxN > thr_L[:, None]).reshape(scores.shape)


def _nm_mask(scores: jax.Array, leaf: Leaf, nm: tuple[int, int], sparsity: jax.Array
             ) -> jax.Array:
    n, m = nm
    s_LxIxO = _as_3d(scores, leaf)
    l, i, o = s_LxIxO.shape
    s_LxGxMxO = s_LxIxO.reshape(l, i // m, m, o)
    pruned = jnp.clip(jnp.floor(sparsity * m + 1e-6), 0, m - n).astype(jnp.int32)
    # rank 0 = largest in its group; ties broken by position (stable sort): exactly m - pruned
    rank = jnp.argsort(jnp.argsort(-s_LxGxMxO, axis=2, stable=True), axis=2, stable=True)
    return (rank < m - pruned).reshape(scores.shape)


def apply(params: Any, masks: Any) -> Any:
    """The params with every pruned weight set to zero."""
    flat_masks = _leaf_dict(masks)

    def zero(path, p):
        m = flat_masks.get(jax.tree_util.keystr(path))
        return p if m is None else jnp.where(m, p, jnp.zeros_like(p))
    return jax.tree_util.tree_map_with_path(zero, params)


# ---- the schedule


def _window(prune: Mapping[str, Any]) -> tuple[int, int, int]:
    """(start, end, every) in steps as logged (step t is the t-th update; 0 counts as 1)."""
    return max(prune["start"], 1), max(prune["end"], 1), prune["every"]


def schedule(prune: Mapping[str, Any], step: jax.Array | int) -> jax.Array:
    """The sparsity after step `step` (as logged: 1 = the first update): Zhu & Gupta's cubic
    ramp s_t = s_f (1 - (1 - (t - start) / (end - start))^3) evaluated at the last mask update
    at or before `step` (every `prune.every` steps from `start`, and at `end`); 0 before
    `start`, `prune.target` from `end` on. start = end prunes once, at that step."""
    start, end, every = _window(prune)
    t = jnp.asarray(step, jnp.int32)
    at = start + (t - start) // every * every
    frac = jnp.where(t >= end, 1.0, jnp.clip((at - start) / max(end - start, 1), 0.0, 1.0))
    return jnp.where(t < start, 0.0, prune["target"] * (1 - (1 - frac) ** 3)).astype(jnp.float32)


def updates_masks(prune: Mapping[str, Any], step: jax.Array | int) -> jax.Array:
    """Whether the masks are recomputed in step `step` (as logged)."""
    start, end, every = _window(prune)
    t = jnp.asarray(step, jnp.int32)
    return (t >= start) & (t <= end) & (((t - start) % every == 0) | (t == end))


# ---- the optimizer transform


class PruneState(NamedTuple):
    count: jax.Array   # updates taken (= the train state's step)
    masks: Any         # params-shaped: bool per pruned weight, optax.MaskedNode() elsewhere
    inner: Any         # the wrapped optimizer's state


def wrap(tx: optax.GradientTransformation, prune: Mapping[str, Any]
         ) -> optax.GradientTransformation:
    """`tx` with pruning (prune.target > 0; else `tx` itself): at a mask update step the masks
    are recomputed from the updated weights' magnitudes at the schedule's sparsity, and every
    step a pruned weight's update is minus the weight, leaving it exactly zero."""
    if not prune["target"]:
        return tx
    prune = dict(prune)
    nm = parse_pattern(prune["pattern"])

    def init(params):
        return PruneState(jnp.zeros((), jnp.int32), initial_masks(params), tx.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("pruning needs the params: call tx.update(grads, state, params)")
        updates, inner = tx.update(grads, state.inner, params)
        step = state.count + 1   # this update's step number, as the loop logs it
        sparsity = schedule(prune, step)

        def recompute(masks):
            new = jax.tree.map(lambda p, u: p + u, params, updates)
            return magnitude_masks(new, masks, sparsity, nm=nm, scope=prune["scope"])

        masks = jax.lax.cond(updates_masks(prune, step), recompute, lambda m: m,
                             state.masks)
        flat_masks = _leaf_dict(masks)

        def masked(path, u, p):
            m = flat_masks.get(jax.tree_util.keystr(path))
            return u if m is None else jnp.where(m, u, -p)
        updates = jax.tree_util.tree_map_with_path(masked, updates, params)
        return updates, PruneState(state.count + 1, masks, inner)

    return optax.GradientTransformation(init, update)


def _leaf_dict(masks: Any) -> dict[str, jax.Array]:
    """keystr(path) -> mask of each pruned leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(
        masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    return {jax.tree_util.keystr(p): m for p, m in leaves if not isinstance(m, optax.MaskedNode)}


def find_state(opt_state: Any) -> PruneState | None:
    return opt_state if isinstance(opt_state, PruneState) else None


def sparsity_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """{'sparsity': the pruned fraction of the pruned kernels' weights} for a pruned run's
    optimizer state; {} otherwise (train/step.py logs it with the step's metrics)."""
    state = find_state(opt_state)
    if state is None:
        return {}
    masks = list(_leaf_dict(state.masks).values())
    pruned = sum(jnp.sum(~m, dtype=jnp.int32) for m in masks)
    return {"sparsity": pruned / sum(m.size for m in masks)}


def per_layer(params: Any) -> dict[str, float]:
    """Zero fraction of each pruned kernel, a scanned kernel split by layer ('.../layers/3/
    attn/query/kernel'), then 'all' over them together (host floats, for reports)."""
    out, zeros, total = {}, 0, 0
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = leaf_kind(path)
        if leaf is None:
            continue
        keys = [str(getattr(k, "key", k)) for k in path]
        z_L = jax.device_get(jnp.sum(_as_3d(p, leaf) == 0, axis=(1, 2)))
        n = p.size // len(z_L)
        for i, z in enumerate(z_L):
            name = "/".join(keys if not leaf.stacked else
                            [f"{k}/{i}" if k == "layers" else k for k in keys])
            out[name] = float(z) / n
        zeros, total = zeros + int(z_L.sum()), total + p.size
    out["all"] = zeros / max(total, 1)
    return out
