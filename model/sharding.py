"""Device mesh from the config's `data`/`fsdp`/`sequence`/`tensor` axes, and logical-name
sharding rules.

Modules only speak logical axis names ("embed", "mlp", "batch", ...); this file is the one place
that turns them into mesh axes, using the `mesh.rules` table of the config.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from errors import MeshError

# Outer to inner. The last axes (tensor, then sequence) exchange the most data; they run over
# neighbouring devices in jax's device order, so on a cluster they stay within a host if they fit.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
Rules = tuple[tuple[str, Any], ...]
log = logging.getLogger(__name__)


def mesh_shape(mesh_cfg: Mapping[str, Any], n_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, sequence, tensor); at most one -1, which takes the remaining
    devices; an axis the config lacks (a run saved before it existed) is 1. A MeshError names
    the `mesh.*` keys that do not fit."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    shown = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise MeshError(f"mesh.{axis}={size}: a mesh axis size is positive, or -1 to take "
                            "the remaining devices")
    fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(fill) > 1:
        raise MeshError(f"{' and '.join(f'mesh.{a}' for a in fill)} are each -1; only one mesh "
                        "axis may be -1 (take the remaining devices)")
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if n_devices % fixed:
            raise MeshError(
                f"{shown}: {n_devices} devices are not divisible by the fixed axes' product "
                f"{fixed}; choose axis sizes that divide {n_devices}")
        sizes[MESH_AXES.index(fill[0])] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(
            f"{shown} needs {fixed} devices but {n_devices} are present; make "
            f"data*fsdp*sequence*tensor equal {n_devices}, or set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Sequence[Sequence[Any]]) -> Rules:
    """Validates the `mesh.rules` table: pairs of (logical name, mesh axis | tuple | None)."""
    out = []
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise MeshError(f"mesh.rules entries are (logical_name, mesh_axes) pairs, got {rule!r}")
        name, axes = rule
        axes_tuple = axes if isinstance(axes, (tuple, list)) else (axes,)
        bad = [a for a in axes_tuple if a is not None and a not in MESH_AXES]
        if bad:
            raise MeshError(f"mesh.rules: {name!r} maps to unknown mesh axes {bad}; "
                            f"mesh axes are {MESH_AXES}")
        named = [a for a in axes_tuple if a is not None]
        if len(set(named)) != len(named):
            raise MeshError(f"mesh.rules: {name!r} maps to {axes!r}, which names a mesh axis "
                            "twice")
        out.append((name, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` and `rules` current, so logical constraints inside jit resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. 2 KV heads on tensor=4)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in names if a is not None)
        if axes is not None and dim % size:
            log.info("%s: dimension %d not divisible by mesh axes %s; replicated", what, dim,
                     axes)
            axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def unboxed(tree: Any) -> Any:
    """The values of a tree of logically-partitioned boxes, without sharding constraints."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False)
                        if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of logically-partitioned (boxed) abstract values."""
    specs = nn.get_partition_spec(abstract_boxed)
    shapes = unboxed(abstract_boxed)

    def one(path, spec, leaf):
        if leaf is None:   # an absent optional field (a quantized kernel's zero point)
            return None
        mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else PartitionSpec()
        return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(
        one, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch over the axes the "batch" rule names, the other
    dimensions replicated (by default unnamed, so it fits [B] and [B, T] batch leaves alike)."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def batch_divisor(axis_sizes: Mapping[str, int], rules: Rules) -> int:
    """How many ways the batch dimension is split over a mesh of `axis_sizes` (a Mesh's
    `.shape`, or sizes from `mesh_shape` before any mesh exists): the batch must be a
    multiple."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(axis_sizes[a] for a in axes if a is not None)


def check_process_rows(mesh: Mesh, rules: Rules) -> None:
    """In a multi-process run every process reads its own rows of the batch
    (`jax.make_array_from_process_local_data`), so no block of rows may lie on devices of two
    processes: the mesh axes outside the batch's must fit within one process's devices."""
    names = nn.logical_to_mesh_axes(("batch",), rules)[0]
    names = [a for a in (names if isinstance(names, tuple) else (names,)) if a is not None]
    owners: dict[tuple[int, ...], set[int]] = {}
    for index in np.ndindex(mesh.devices.shape):
        block = tuple(index[mesh.axis_names.index(a)] for a in names)
        owners.setdefault(block, set()).add(mesh.devices[index].process_index)
    shared = next((sorted(p) for p in owners.values() if len(p) > 1), None)
    if shared:
        inner = ", ".join(f"mesh.{a}={n}" for a, n in mesh.shape.items()
                          if a not in names and n > 1)
        raise MeshError(
            f"{inner} spans the devices of processes {shared}, which read different rows of the "
            f"batch; axes outside the batch's must fit within one process's "
            f"{jax.local_device_count()} devices: make them smaller, or run fewer processes with "
            "more devices each (e.g. one per host)")


def wait_for_all_processes(name: str, timeout_s: int = 3 * 3600) -> None:
    """A barrier of every process of a jax.distributed cluster through its coordination service,
    which waits as long as the slowest process needs (preparing a corpus, compiling); a device
    collective on CPU processes (gloo) gives up when one arrives 30 s after another. `name`
    must be the same on every process and new for each barrier."""
    from jax._src import distributed   # its client is what jax's own serialization waits on
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
