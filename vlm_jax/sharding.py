"""Mesh construction and logical-axis sharding.

Mesh axes are `data`, `fsdp`, `tensor`; any may be 1, and one may be -1 (fill with the
remaining devices). On a multi-slice job the data axis also spans the slices (DCN).
Weights and activations carry logical axis names (see
models/layers.py); one rule table maps them to mesh axes:

    data parallel:  batch -> (data, fsdp), weights replicated
    FSDP / ZeRO-3:  weight "embed" dims -> fsdp (optimizer state follows its params)
    tensor (Megatron): "mlp", "heads", "kv_heads", "vocab" -> tensor
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace a single -1 by the remaining device count; check the product."""
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={tuple(shape)} must have one size per axis {MESH_AXES}")
    if list(shape).count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={tuple(shape)}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape={tuple(shape)}: {num_devices} devices are not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh.shape={tuple(shape)} has {math.prod(shape)} devices but {num_devices} are "
            f"available; use sizes whose product is {num_devices} (or -1 for one axis)"
        )
    return tuple(shape)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many slices (ICI-connected groups, joined by DCN) the devices span: TPU devices of
    a multi-slice job carry `slice_index`; other devices are one slice."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def split_dcn(shape: Sequence[int], slices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ICI shape inside one slice, DCN shape across slices) of a resolved mesh shape.

    Only the data axis crosses slices (data parallel over DCN: one gradient all-reduce per
    step there); fsdp and tensor collectives run every layer and must stay on ICI.
    """
    data, *inner = shape
    if data % slices:
        raise ValueError(
            f"mesh.shape={tuple(shape)}: the data axis ({data}) must be a multiple of the "
            f"{slices} slices (data parallel across slices; fsdp and tensor stay inside one)"
        )
    return (data // slices, *inner), (slices, *([1] * len(inner)))


def build_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), topology-aware.

    `shape` covers all devices. Devices of several slices get a hybrid mesh whose data axis
    is (slices over DCN) x (data / slices over ICI), so the ICI axes never cross slices.
    """
    devices = list(devices) if devices is not None else jax.devices()
    resolved = resolve_mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = num_slices(devices)
    if slices == 1:
        return jax.make_mesh(resolved, MESH_AXES, axis_types=axis_types, devices=devices)
    ici, dcn = split_dcn(resolved, slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim split over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree whose leaves may be flax Partitioned boxes."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def check_divisible(abstract_tree) -> None:
    """Every dim split over mesh axes must divide evenly; else name the weight and the fix.

    `abstract_tree`: ShapeDtypeStructs (or arrays) with NamedShardings, e.g. the trainer's
    abstract params. Catching this before compilation turns XLA's shape error into one that
    names the parameter, its dim and the mesh axes.
    """
    for path, leaf in jax.tree.leaves_with_path(abstract_tree):
        mesh_shape = leaf.sharding.mesh.shape
        for dim, (size, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = math.prod(mesh_shape[a] for a in axes)
            if size % ways:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} of shape {leaf.shape}: dim {dim} (size {size}) "
                    f"is split over mesh axes {axes} = {ways} ways, which does not divide it; "
                    f"change the model sizes, mesh.shape {dict(mesh_shape)} or sharding.rules"
                )


def global_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int | None = None
) -> dict[str, jax.Array]:
    """Assemble per-process batches into global arrays sharded over the batch axes.

    `local_batch` holds this process's rows (`process_batch_rows`); pass `global_batch_size`
    whenever processes may share rows (a batch replicated over processes), since the global
    shape cannot be inferred from the local one then.
    """
    return {
        key: jax.make_array_from_process_local_data(
            batch_sharding(mesh, value.ndim),
            value,
            None if global_batch_size is None else (global_batch_size, *value.shape[1:]),
        )
        for key, value in local_batch.items()
    }


@dataclasses.dataclass(frozen=True)
class BatchRows:
    """The rows of the global batch that this process's devices hold: `spans` [start, stop),
    sorted. On a pod the topology-aware device order often places a host's chips at several
    places along the batch axes (v5p-64, data parallel: host 0 holds rows [0, 1024),
    [4096, 5120), [16384, 17408), [20480, 21504) of 32,768), so the spans need not touch. The
    process's local batch is its spans' rows concatenated in this order, which is what
    `jax.make_array_from_process_local_data` (`global_batch`) reads."""

    spans: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return sum(stop - start for start, stop in self.spans)

    @property
    def start(self) -> int:
        return self.spans[0][0]

    def take(self, array: np.ndarray) -> np.ndarray:
        """This process's rows of a global-batch array [B, ...] -> [count, ...]."""
        return np.concatenate([array[start:stop] for start, stop in self.spans])


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> BatchRows:
    """The rows of the global batch that this process's devices hold (see `BatchRows`).

    Batch axes that span processes split the batch between them; a batch replicated over
    processes (e.g. a pure tensor-parallel mesh) gives several processes the same rows, and
    those processes must then load the same data.
    """
    if global_batch_size % data_parallel_size(mesh):
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the mesh's data-parallel "
            f"size {data_parallel_size(mesh)} (mesh {dict(mesh.shape)})"
        )
    indices = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
    spans = sorted({index[0].indices(global_batch_size)[:2] for index in indices.values()})
    merged = [list(spans[0])]
    for start, stop in spans[1:]:  # adjacent device rows as one span
        if start == merged[-1][1]:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return BatchRows(tuple((start, stop) for start, stop in merged))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (all processes must call it together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """Bytes of `tree`'s array leaves resident on each addressable device."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def eval_chunk_size(mesh: Mesh, batch_size: int) -> int:
    """Rows per evaluation chunk: `batch_size` rounded down to a multiple of the data-parallel
    size (at least one row per data shard), so every chunk splits evenly over the batch axes."""
    dp = data_parallel_size(mesh)
    return max(dp, batch_size // dp * dp)
