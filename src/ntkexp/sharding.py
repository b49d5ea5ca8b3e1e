"""Multi-device execution with JAX's own sharding (Mesh, NamedSharding, shard_map).

Three things scale past one device (the same code on CPU and GPU; on CPU the
multi-device paths are tested with ``--xla_force_host_platform_device_count=4``):

* kernel blocks -- :func:`sharded_kernel` splits the rows of ``x1`` across the
  devices of a 1-D mesh and runs ``fn(x1_block, x2)`` on each with
  ``jax.shard_map`` (any analytic or empirical kernel function);
* ensembles of initialisations -- :func:`shard_ensemble` places the leading
  (initialisation) axis of a stacked parameter pytree across devices, so a
  ``jit(vmap(step))`` over it runs sharded by XLA's partitioner;
  :func:`sharded_vmap` does the same explicitly with ``shard_map``;
* multi-host runs -- :func:`maybe_init_distributed` calls
  ``jax.distributed.initialize`` when a config asks for it.

On CPU, test with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set
before jax is imported. Padding rows (copies of the first row or member) make
any size divisible by the number of devices; they are dropped from the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "devices"


def make_mesh(devices: Sequence | int | None = None, axis_name: str = AXIS) -> Mesh:
    """A 1-D :class:`jax.sharding.Mesh` over ``devices``.

    Args:
      devices: a sequence of devices, an int ``k`` (the first ``k`` of
        ``jax.devices()``) or None (all of ``jax.devices()``).
      axis_name: the mesh axis name.
    """
    all_devices = jax.devices()
    if devices is None:
        devices = all_devices
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(all_devices):
            raise ValueError(
                f"asked for {devices} devices but only {len(all_devices)} are available"
            )
        devices = all_devices[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devices), (axis_name,))


def _mesh_axis(mesh: Mesh | None) -> tuple[Mesh, str, int]:
    if mesh is None:
        mesh = make_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D mesh, got axes {mesh.axis_names}")
    name = mesh.axis_names[0]
    return mesh, name, int(mesh.shape[name])


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)


def _symmetrize(k):
    k = jnp.asarray(k)
    if k.ndim == 2 and k.shape[0] == k.shape[1]:
        return (k + k.T) / 2
    if k.ndim == 4 and k.shape[0] == k.shape[1] and k.shape[2] == k.shape[3]:
        return (k + jnp.transpose(k, (1, 0, 3, 2))) / 2
    return k


def sharded_kernel(fn: Callable, x1, x2=None, *, args: tuple = (), mesh: Mesh | None = None,
                   block_size: int | None = None):
    """Compute ``fn(x1, x2, *args)`` with the rows of ``x1`` split across devices.

    ``fn`` must be row-separable: row ``i`` of every output depends on ``x1[i]``
    only (true of any kernel ``k(x1, x2)``). Each device runs ``fn`` on its
    block of rows against the whole ``x2`` under ``jax.shard_map``; ``args``
    (e.g. network parameters) are replicated.

    Args:
      fn: ``fn(x1_block (b, ...), x2 (n2, ...), *args) -> pytree`` of arrays
        with leading axis ``b`` (e.g. a ``Kernel`` of ``(b, n2)`` matrices).
      x1: ``(n1, ...)`` inputs, split by rows.
      x2: ``(n2, ...)`` inputs, or None for ``x2 = x1``; then 2-D square
        outputs are symmetrized so that they are exactly symmetric.
      args: extra arguments of ``fn``, replicated on every device.
      mesh: a 1-D mesh (default: all of ``jax.devices()``).
      block_size: if given, each device works through its rows in blocks of
        this many (``lax.map``) to bound memory.

    Returns:
      ``fn``'s pytree with leading axis ``n1``, sharded over the mesh.

    Example::

        k = sharded_kernel(lambda a, b: analytic_kernel(spec, a, b), x)
        K = sharded_kernel(lambda a, b, p: empirical_ntk(apply_fn, p, a, b), x, args=(params,))
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    mesh, name, ndev = _mesh_axis(mesh)
    sym = x2 is None
    x1 = jnp.asarray(x1)
    x2 = x1 if sym else jnp.asarray(x2)
    if x1.ndim < 1 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have at least one row, got shape {tuple(x1.shape)}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    n1 = x1.shape[0]
    per = block_size or 1
    x1p = _pad_rows(x1, ndev * per)

    def local(a, b, *rest):
        if block_size is None:
            return fn(a, b, *rest)
        blocks = a.reshape(-1, block_size, *a.shape[1:])
        out = jax.lax.map(lambda blk: fn(blk, b, *rest), blocks)
        return jax.tree_util.tree_map(lambda o: o.reshape(-1, *o.shape[2:]), out)

    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(name), P()) + (P(),) * len(args),
                                out_specs=P(name), check_vma=False))
    out = run(x1p, x2, *args)
    out = jax.tree_util.tree_map(lambda o: o[:n1], out)
    if sym:
        out = jax.tree_util.tree_map(_symmetrize, out)
    return out


def _leading_size(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("the ensemble pytree has no arrays")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "every leaf of a stacked ensemble needs the same leading (initialisation) axis, "
            f"got leading sizes {sorted(s for s in sizes if s is not None)}"
            + (" and scalars" if None in sizes else "")
        )
    return sizes.pop()


def ensemble_mesh(n_members: int, devices: Sequence | None = None, axis_name: str = AXIS) -> Mesh:
    """A 1-D mesh on the largest number of devices that divides ``n_members``."""
    devices = list(jax.devices() if devices is None else devices)
    k = max(d for d in range(1, len(devices) + 1) if n_members % d == 0)
    return make_mesh(devices[:k], axis_name)


def shard_ensemble(tree, mesh: Mesh | None = None):
    """Place the leading (initialisation) axis of a stacked pytree across devices.

    A subsequent ``jax.jit(jax.vmap(step))(tree, ...)`` then runs each device's
    members on that device (XLA's SPMD partitioner follows the input sharding).

    Args:
      tree: pytree whose leaves all have the same leading size K.
      mesh: a 1-D mesh whose size divides K; default: :func:`ensemble_mesh`
        (the largest number of available devices that divides K).

    Returns:
      The same pytree, each leaf a ``jax.Array`` with ``NamedSharding(mesh, P(axis))``.
    """
    K = _leading_size(tree)
    if mesh is None:
        mesh = ensemble_mesh(K)
    mesh, name, ndev = _mesh_axis(mesh)
    if K % ndev:
        raise ValueError(
            f"an ensemble of {K} initialisations cannot be split evenly over {ndev} devices; "
            "pass a mesh whose size divides it (or mesh=None to pick one)"
        )
    sharding = NamedSharding(mesh, P(name))
    return jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, sharding), tree)


def sharded_vmap(fn: Callable, *, mesh: Mesh | None = None) -> Callable:
    """``vmap(fn)`` over the leading axis of its first argument, sharded across devices.

    Returns ``g(stacked, *args)``: ``stacked`` (a pytree with leading axis K,
    e.g. an ensemble of parameters) is split across the mesh with
    ``jax.shard_map`` and each device vmaps ``fn(member, *args)`` over its
    members; ``args`` are replicated. K need not divide the device count
    (padding members are copies of the first and are dropped).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")

    def g(stacked, *args):
        m, name, ndev = _mesh_axis(mesh)
        K = _leading_size(stacked)
        padded = jax.tree_util.tree_map(lambda leaf: _pad_rows(jnp.asarray(leaf), ndev), stacked)
        run = jax.jit(jax.shard_map(
            lambda s, *a: jax.vmap(lambda member: fn(member, *a))(s),
            mesh=m, in_specs=(P(name),) + (P(),) * len(args), out_specs=P(name),
            check_vma=False))
        out = run(padded, *args)
        return jax.tree_util.tree_map(lambda o: o[:K], out)

    return g


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host settings, passed to ``jax.distributed.initialize``.

    Attributes:
      enabled: initialise the distributed runtime.
      coordinator_address: ``"host:port"`` of process 0 (None: auto-detect on
        clusters JAX knows, e.g. SLURM, Cloud TPU).
      num_processes: total number of processes (None: auto-detect).
      process_id: this process's index (None: auto-detect).
      local_device_ids: devices this process uses (None: all local ones).
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise TypeError(f"distributed.enabled must be true or false, got {self.enabled!r}")
        if self.coordinator_address is not None and not isinstance(self.coordinator_address, str):
            raise TypeError("distributed.coordinator_address must be a 'host:port' string, "
                            f"got {self.coordinator_address!r}")
        for name in ("num_processes", "process_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"distributed.{name} must be an integer >= 0, got {v!r}")
        ids = self.local_device_ids
        if ids is not None:
            ids = (ids,) if isinstance(ids, int) else tuple(ids)
            if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise ValueError(f"distributed.local_device_ids must be integers, got {ids!r}")
            object.__setattr__(self, "local_device_ids", ids)


_FIELDS = {f.name for f in dataclasses.fields(DistributedConfig)}


def _as_distributed(config: Any) -> DistributedConfig:
    if config is None:
        return DistributedConfig()
    if isinstance(config, DistributedConfig):
        return config
    if isinstance(config, bool):
        return DistributedConfig(enabled=config)
    if isinstance(config, Mapping):
        if "distributed" in config:
            return _as_distributed(config["distributed"])
        unknown = set(config) - _FIELDS
        if unknown:
            raise ValueError(
                f"unknown distributed setting(s) {sorted(unknown)}; known: {sorted(_FIELDS)}"
            )
        return DistributedConfig(**dict(config))
    if hasattr(config, "distributed"):  # a whole run config object
        return _as_distributed(config.distributed)
    raise TypeError(
        "maybe_init_distributed takes None, a bool, a mapping, a DistributedConfig or an "
        f"object with a 'distributed' attribute, got {type(config).__name__}"
    )


def maybe_init_distributed(config: Any = None) -> bool:
    """Call ``jax.distributed.initialize`` if ``config`` asks for a multi-host run.

    Args:
      config: None or False (single host: nothing happens), True (initialise
        with auto-detection), a :class:`DistributedConfig`, a mapping of its
        fields (or a mapping / object with a ``distributed`` entry holding one).

    Returns:
      True if this call initialised the runtime (or it already was), False if
      not asked. Must run before any other JAX call touches the devices.
    """
    cfg = _as_distributed(config)
    if not cfg.enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {k: getattr(cfg, k) for k in ("coordinator_address", "num_processes",
                                           "process_id", "local_device_ids")
              if getattr(cfg, k) is not None}
    if "local_device_ids" in kwargs:
        kwargs["local_device_ids"] = list(kwargs["local_device_ids"])
    jax.distributed.initialize(**kwargs)
    return True


__all__ = [
    "AXIS",
    "DistributedConfig",
    "ensemble_mesh",
    "make_mesh",
    "maybe_init_distributed",
    "shard_ensemble",
    "sharded_kernel",
    "sharded_vmap",
]
