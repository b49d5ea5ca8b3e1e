"""Any kernel in tiles of rows under a memory budget, optionally sharded and streamed to disk.

:func:`tiled_kernel` takes a *tile function* ``fn(x1_tile, x2_tile, *args)``
returning a :class:`~ntkexp.kernels.base.Kernel`, an array or any pytree of
arrays with leading axes ``(t1, t2)``, and assembles the ``(n1, n2)`` result
tile by tile:

* **Budget.** The tile side ``t`` is the largest whose working memory fits
  ``memory_budget`` (API argument; ``kernels.memory_budget`` in a config;
  default :data:`DEFAULT_MEMORY_BUDGET`). The cost comes from the tile
  function itself: XLA's memory analysis of the compiled tile
  (``jax.jit(fn).lower(...).compile().memory_analysis()``: temporaries +
  arguments + outputs) at two probe sizes ``t_a < t_b`` gives a per-pair cost
  ``(m_b - m_a) / (t_b^2 - t_a^2)`` and a fixed cost; the host copy of one
  tile (twice, for the mirrored write) is added. Held in memory, the result
  itself (``n1 n2`` entries per leaf) counts against the budget too; streamed
  to disk it does not. A budget too small for a 1 x 1 tile is one
  :class:`TilingError`.
* **Symmetry.** ``x2=None`` means ``x2 = x1``: only tiles ``I <= J`` are
  computed; each off-diagonal tile is also written transposed, and each
  diagonal tile is replaced by its mirrored upper triangle, so the result is
  exactly symmetric.
* **Shapes.** Every tile has the same shape (the last row / column of tiles is
  padded with copies of its first input and cropped), so the tile function is
  compiled once per device.
* **Devices and processes.** ``devices="all"`` runs one tile per local device
  at a time (JAX's asynchronous dispatch overlaps them); on a multi-process
  run (``jax.process_count() > 1``) tile ``g`` (in the fixed grid order) is
  computed by process ``g % process_count``, which requires ``out`` on a file
  system all processes share.
* **Streaming and resume.** With ``out="k.npy"`` the result is an ``.npy``
  memory map (``np.lib.format.open_memmap``; leaves stacked on a leading
  axis) with a sidecar manifest ``k.npy.manifest.json`` (one per process on a
  multi-process run) listing the finished tiles, the tile side and a
  fingerprint of the tile function, its arguments and the inputs. A tile is
  listed only after its values are flushed to the file, so an interrupted
  computation resumes from the finished tiles; a file made for another
  config or other inputs is one :class:`TilingError` and is left untouched.

Example::

    fn = ntkexp.tiles.analytic_tiles(spec)         # any registered architecture
    k = tiled_kernel(fn, x_train, memory_budget="1GiB")            # Kernel of (n, n)
    k_te = tiled_kernel(fn, x_test, x_train, out="runs/k_te.npy")  # resumable
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ntkexp import io

DEFAULT_MEMORY_BUDGET = 2 * 2**30
FORMAT_VERSION = 1
_PROBES = (8, 16)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class TilingError(ValueError):
    """A tiling cannot proceed: budget too small for one tile, or a foreign kernel file."""


def parse_bytes(value) -> int:
    """``2147483648``, ``"2GiB"``, ``"512 MB"``, ``"1.5g"`` -> bytes (an int > 0).

    Raises:
      ValueError: not a positive size.
    """
    if isinstance(value, bool):
        raise ValueError(f"memory_budget must be a number of bytes or a size like '2GiB', "
                         f"got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget {value!r} is not a size (examples: 2GiB, 512MB, "
                             "1e9)")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"memory_budget must be a number of bytes or a size like '2GiB', "
                         f"got {type(value).__name__}")
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"memory_budget must be positive, got {value!r}")
    return int(n)


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------
# Tile functions with a stable fingerprint
# --------------------------------------------------------------------------


# The tile functions of an architecture's limit, an empirical NTK or a Monte Carlo
# average live in ntkexp.tiles (they name models); this module tiles any function.


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


class TilePlan(NamedTuple):
    """How a kernel is tiled.

    Attributes:
      tile: tile side ``t`` (tiles are ``min(t, n1) x min(t, n2)``).
      n1, n2: result rows and columns; sym: ``x2 is None``.
      tiles: ``[(row_start, col_start)]`` in grid order (upper tiles only if sym).
      pair_bytes, fixed_bytes: measured working memory of a tile,
        ``fixed + pair * t1 * t2`` (per concurrently running tile).
      tile_bytes: working memory of one tile at the chosen side (all concurrent tiles).
      result_bytes: the result's bytes held in memory (0 when streamed).
      budget: the budget in bytes.
    """

    tile: int
    n1: int
    n2: int
    sym: bool
    tiles: tuple[tuple[int, int], ...]
    pair_bytes: float
    fixed_bytes: float
    tile_bytes: int
    result_bytes: int
    budget: int


def _memory(jfn, shape1, shape2, dtype, args) -> tuple[int, Any]:
    s1 = jax.ShapeDtypeStruct(shape1, dtype)
    s2 = jax.ShapeDtypeStruct(shape2, dtype)
    lowered = jfn.lower(s1, s2, *args)
    out = jax.eval_shape(jfn, s1, s2, *args)
    out_bytes = sum(leaf.size * np.dtype(leaf.dtype).itemsize
                    for leaf in jax.tree_util.tree_leaves(out))
    try:
        m = lowered.compile().memory_analysis()
        used = int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        m = None
    if m is None:  # stated fallback: 16 x the tile's output
        used = 16 * out_bytes
    return used, out


def _probe(jfn, x1, x2, args) -> tuple[float, float, Any]:
    """``(pair_bytes, fixed_bytes, out_struct)`` of the tile function (two probe sizes)."""
    dt = x1.dtype
    n1, n2 = x1.shape[0], x2.shape[0]
    sizes = sorted({min(p, n1, n2) for p in _PROBES} | {min(_PROBES[-1], n1, n2)})
    ms = []
    out = None
    for t in sizes:
        used, out = _memory(jfn, (t,) + x1.shape[1:], (t,) + x2.shape[1:], dt, args)
        ms.append((t, used))
    if len(ms) == 1:
        t, used = ms[0]
        return used / (t * t), 0.0, out
    (ta, ma), (tb, mb) = ms[0], ms[-1]
    pair = max((mb - ma) / (tb * tb - ta * ta), 0.0)
    fixed = max(ma - pair * ta * ta, 0.0)
    if pair == 0.0:
        pair = mb / (tb * tb)
    return pair, fixed, out


def _out_leaves(out_struct):
    leaves, treedef = jax.tree_util.tree_flatten(out_struct)
    for leaf in leaves:
        if leaf.ndim < 2:
            raise ValueError(f"the tile function must return arrays with leading axes (t1, t2), "
                             f"got a leaf of shape {tuple(leaf.shape)}")
    return leaves, treedef


def plan_tiles(fn, x1, x2=None, *, args: tuple = (), memory_budget=None,
               tile_size: int | None = None, stream: bool = False,
               concurrent: int = 1) -> TilePlan:
    """Choose the tile side for ``fn`` on these inputs under ``memory_budget``.

    Args:
      fn: tile function ``fn(a (t1, ...), b (t2, ...), *args)``.
      x1, x2: inputs (x2 None: symmetric).
      args: extra arguments of ``fn`` (replicated).
      memory_budget: bytes or a size string (default :data:`DEFAULT_MEMORY_BUDGET`).
      tile_size: force this tile side (still checked against the budget).
      stream: the result goes to disk (its bytes do not count against the budget).
      concurrent: tiles running at once in the same memory (CPU devices).

    Raises:
      TilingError: the budget cannot hold the result (when not streamed) plus one
        1 x 1 tile, or ``tile_size`` does not fit.
    """
    budget = parse_bytes(DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)
    x1 = np.asarray(x1)
    sym = x2 is None
    x2a = x1 if sym else np.asarray(x2)
    n1, n2 = x1.shape[0], x2a.shape[0]
    jfn = jax.jit(fn)
    if tile_size is not None and memory_budget is None:
        # a forced tile side and no budget: nothing to check, so nothing is probed
        pair = fixed = float("nan")
        t = min(_check_tile(tile_size), max(n1, n2))
        s1 = jax.ShapeDtypeStruct((min(t, n1),) + x1.shape[1:], x1.dtype)
        s2 = jax.ShapeDtypeStruct((min(t, n2),) + x2a.shape[1:], x2a.dtype)
        _out_leaves(jax.eval_shape(jfn, s1, s2, *args))
        return TilePlan(t, n1, n2, sym, _grid(n1, n2, t, sym), pair, fixed, 0, 0, budget)
    pair, fixed, out = _probe(jfn, x1, x2a, args)
    leaves, _ = _out_leaves(out)
    # host bytes per pair of one tile (the tile's copy plus its mirrored/transposed copy)
    host_pair = 2 * sum(int(np.prod(leaf.shape[2:], dtype=np.int64))
                        * np.dtype(leaf.dtype).itemsize for leaf in leaves)
    entry_bytes = host_pair // 2
    result = 0 if stream else n1 * n2 * entry_bytes

    def cost(t):
        p = min(t, n1) * min(t, n2)
        return int(concurrent * (fixed + pair * p) + host_pair * p)

    avail = budget - result
    if avail < cost(1):
        extra = ("" if stream else f" plus the result held in memory ({_fmt(result)}; stream "
                 "it to disk with out=/kernels.stream to leave it out)")
        raise TilingError(
            f"memory_budget {_fmt(budget)} is too small for one 1 x 1 tile of this kernel: it "
            f"needs {_fmt(cost(1))} (measured: {_fmt(fixed)} fixed + {_fmt(pair)} per pair "
            f"of inputs){extra}; raise memory_budget")
    if tile_size is not None:
        _check_tile(tile_size)
        if cost(tile_size) > avail:
            raise TilingError(
                f"tile_size {tile_size} needs {_fmt(cost(tile_size))} of working memory, "
                f"more than memory_budget {_fmt(budget)} leaves ({_fmt(avail)}); lower "
                "tile_size or raise memory_budget")
        t = tile_size
    else:
        lo, hi = 1, max(n1, n2)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= avail:
                lo = mid
            else:
                hi = mid - 1
        t = lo
    t = min(t, max(n1, n2))
    return TilePlan(t, n1, n2, sym, _grid(n1, n2, t, sym), pair, fixed, cost(t), result, budget)


def _check_tile(tile_size) -> int:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    return tile_size


def _grid(n1: int, n2: int, t: int, sym: bool) -> tuple[tuple[int, int], ...]:
    """Tile starts in grid order (row-major; upper tiles only when ``sym``)."""
    if sym:
        starts = list(range(0, n1, t))
        return tuple((a, b) for i, a in enumerate(starts) for b in starts[i:])
    return tuple((a, b) for a in range(0, n1, t) for b in range(0, n2, t))


# --------------------------------------------------------------------------
# Streaming files
# --------------------------------------------------------------------------


def _digest(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def fingerprint_of(fn, x1, x2, args: tuple = (), extra: str | None = None) -> str:
    """Hash of the tile function (its ``fingerprint`` attribute, else its module and
    qualified name), ``extra``, the arguments and the inputs."""
    name = getattr(fn, "fingerprint", None)
    if name is None:
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION}|{name}|{extra or ''}|sym={x2 is None}".encode())
    h.update(_digest(x1).encode())
    if x2 is not None:
        h.update(_digest(x2).encode())
    for leaf in jax.tree_util.tree_leaves(args):
        h.update(_digest(leaf).encode())
    return h.hexdigest()[:32]


def _manifest_path(out: str, process: int, nproc: int) -> str:
    return f"{out}.manifest.json" if nproc == 1 else f"{out}.manifest.p{process}.json"


def _read_manifests(out: str) -> list[tuple[str, dict]]:
    found = []
    for p in sorted(glob.glob(glob.escape(out) + ".manifest*.json")):
        try:
            with open(p) as f:
                found.append((p, json.load(f)))
        except (OSError, ValueError):
            raise TilingError(f"kernel manifest {p!r} is unreadable; it was not written by "
                              "ntkexp (or is damaged): move it away or pass another out=") \
                from None
    return found


def _manifest(fp, shape, tile, sym, n_tiles, process, nproc, done) -> dict:
    return {"format": FORMAT_VERSION, "fingerprint": fp, "shape": list(shape), "tile": tile,
            "sym": sym, "n_tiles": n_tiles, "process": process, "processes": nproc,
            "done": sorted(done)}


def _open_stream(out, shape, dtype, fp, create_manifest: dict | None):
    """Validate the ``.npy`` at ``out`` (or, with ``create_manifest``, create it after
    writing that manifest); return ``(tile, done set)``."""
    manifests = _read_manifests(out)
    exists = os.path.exists(out)
    if exists and not manifests:
        raise TilingError(f"{out!r} exists but has no ntkexp manifest beside it, so it is not "
                          "a kernel file of this computation; pass another out= or delete it")
    done: set[int] = set()
    tile = None
    for p, m in manifests:
        if m.get("fingerprint") != fp or tuple(m.get("shape", ())) != tuple(shape):
            raise TilingError(
                f"kernel file {out!r} was computed for another config or other inputs "
                f"(manifest {os.path.basename(p)}: fingerprint {m.get('fingerprint')}, shape "
                f"{m.get('shape')}; this computation: {fp}, {list(shape)}); nothing was "
                "changed: pass another out= or delete the file to recompute")
        if tile is not None and m.get("tile") != tile:
            raise TilingError(f"manifests of {out!r} disagree on the tile size")
        tile = m.get("tile")
        done.update(int(i) for i in m.get("done", []))
    if exists:
        try:
            arr = np.load(out, mmap_mode="r")
        except Exception as e:  # noqa: BLE001
            raise TilingError(f"kernel file {out!r} is unreadable ({e}); delete it to "
                              "recompute") from None
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise TilingError(f"kernel file {out!r} holds {arr.dtype}{arr.shape}, this "
                              f"computation makes {np.dtype(dtype)}{tuple(shape)}; pass another "
                              "out= or delete it")
        del arr
    elif create_manifest is not None:
        # the manifest first: a crash between the two leaves a manifest without a file,
        # which the next call recreates (never a file without a manifest)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        m = dict(create_manifest)
        io.write_json(_manifest_path(out, m["process"], m["processes"]), m)
        tmp = f"{out}.tmp{os.getpid()}"
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        mm.flush()
        del mm
        os.replace(tmp, out)
        done = set()
        tile = m["tile"]
    return tile, done


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------


def _transpose(leaf: np.ndarray) -> np.ndarray:
    """``k(x_j, x_i)`` from ``k(x_i, x_j)``: rows/columns swapped (and the output pair for
    ``(t1, t2, o, o)`` leaves)."""
    axes = (1, 0) + ((3, 2) if leaf.ndim == 4 else tuple(range(2, leaf.ndim)))
    return np.transpose(leaf, axes)


def _mirror(leaf: np.ndarray) -> np.ndarray:
    """Exactly symmetric copy of a diagonal tile: its upper triangle mirrored."""
    t = leaf.shape[0]
    upper = np.triu(np.ones((t, t), bool)).reshape((t, t) + (1,) * (leaf.ndim - 2))
    return np.where(upper, leaf, _transpose(leaf))


def _pad(x: np.ndarray, start: int, t: int) -> np.ndarray:
    blk = x[start:start + t]
    if blk.shape[0] < t:
        blk = np.concatenate([blk, np.repeat(blk[:1], t - blk.shape[0], axis=0)])
    return blk


def _resolve_devices(devices) -> list:
    if devices is None:
        return [None]
    if devices == "all":
        return list(jax.local_devices())
    if isinstance(devices, int) and not isinstance(devices, bool):
        local = jax.local_devices()
        if not 1 <= devices <= len(local):
            raise ValueError(f"asked for {devices} devices but {len(local)} are available")
        return local[:devices]
    return list(devices)


def tiled_kernel(fn, x1, x2=None, *, args: tuple = (), memory_budget=None,
                 tile_size: int | None = None, out: str | None = None,
                 fingerprint: str | None = None, devices=None,
                 processes: tuple[int, int] | None = None, quiet: bool = False,
                 on_tile: Callable[[int, int], None] | None = None,
                 desc: str = "kernel tiles"):
    """``fn(x1, x2, *args)`` assembled from tiles under ``memory_budget``.

    Args:
      fn: tile function ``(a (t1, ...), b (t2, ...), *args) -> pytree`` of arrays
        with leading axes ``(t1, t2)`` (a ``Kernel``, an array...); row-separable
        (row i of a tile depends on ``a[i]`` only, column j on ``b[j]`` only).
        Use :func:`ntkexp.tiles.analytic_tiles`, :func:`ntkexp.tiles.empirical_tiles` or
        :class:`ntkexp.tiles.MonteCarloTiles`
        for the built-in kernels.
      x1: ``(n1, ...)`` inputs. x2: ``(n2, ...)`` or None (``x2 = x1``: exactly
        symmetric result, upper tiles only).
      args: extra arguments of ``fn`` (network parameters, a PRNG key), passed to
        every tile and hashed into the fingerprint.
      memory_budget: bytes or a size string (``"2GiB"``); default
        :data:`DEFAULT_MEMORY_BUDGET`. Covers the result when held in memory
        plus the working memory of the concurrently running tiles; not the
        inputs, and not the runtime's own constant footprint (see
        ``benchmarks/bench_tiling.py``).
      tile_size: force the tile side (checked against the budget).
      out: stream to this ``.npy`` file (and ``<out>.manifest.json``);
        an interrupted computation resumes from its finished tiles.
      fingerprint: text identifying the kernel's config, hashed with the inputs
        (needed for closures, whose name alone does not identify them).
      devices: None (default device), ``"all"`` (every local device), an int
        (the first k) or a list of devices: one tile per device at a time.
      processes: ``(index, count)``; default ``(jax.process_index(),
        jax.process_count())``. Tile ``g`` is computed by process ``g % count``.
      quiet: no progress bar.
      on_tile: called as ``on_tile(finished, to_do)`` after each tile is recorded.
      desc: progress bar label.

    Returns:
      ``fn``'s pytree of ``(n1, n2, ...)`` numpy arrays (read-only memory maps of
      ``out`` when streaming), or None when other processes still have tiles to
      compute (possible only with an explicit ``processes`` in a single process).

    Raises:
      TilingError: the budget is too small for one tile, or ``out`` belongs to
        another config/inputs (the file is left as it was).
    """
    sym = x2 is None
    x1n, x2n = _tile_inputs(x1, x2)
    devs = _resolve_devices(devices)
    concurrent = len(devs) if all(d is None or d.platform == "cpu" for d in devs) else 1
    pidx, pcount = processes if processes is not None else (jax.process_index(),
                                                            jax.process_count())
    if pcount > 1 and out is None:
        raise ValueError("a multi-process tiled kernel needs out= (a path all processes share)")
    plan = plan_tiles(fn, x1n, None if sym else x2n, args=args, memory_budget=memory_budget,
                      tile_size=tile_size, stream=out is not None, concurrent=concurrent)
    jfn = jax.jit(fn)
    t = plan.tile
    probe = jax.eval_shape(jfn, jax.ShapeDtypeStruct((min(t, plan.n1),) + x1n.shape[1:],
                                                     x1n.dtype),
                           jax.ShapeDtypeStruct((min(t, plan.n2),) + x2n.shape[1:], x2n.dtype),
                           *args)
    leaves, treedef = _out_leaves(probe)
    if out is None:
        sink = _MemorySink([np.zeros((plan.n1, plan.n2) + leaf.shape[2:], leaf.dtype)
                            for leaf in leaves])
    else:
        sink, plan = _open_sink(out, fn, x1n, None if sym else x2n, args, fingerprint, plan,
                                leaves, pidx, pcount, memory_budget, concurrent)
    mine = [g for g in range(len(plan.tiles)) if g % pcount == pidx and g not in sink.done]
    _run_tiles(jfn, plan, x1n, x2n, args, sym, devs, mine, sink, quiet=quiet,
               on_tile=on_tile, desc=desc)
    if out is None:
        return jax.tree_util.tree_unflatten(treedef, sink.result)
    return sink.close(treedef, len(plan.tiles))


def _tile_inputs(x1, x2):
    """``(x1, x2)`` as numpy arrays of one dtype (``x2 = x1`` when None); clear errors."""
    x1n = np.asarray(x1)
    x2n = x1n if x2 is None else np.asarray(x2)
    if x1n.ndim < 1 or x1n.shape[0] == 0 or x2n.shape[0] == 0:
        raise ValueError(f"inputs must have at least one row, got {x1n.shape} and {x2n.shape}")
    if x1n.shape[1:] != x2n.shape[1:]:
        raise ValueError(f"x1 and x2 must have the same trailing shape, got {x1n.shape[1:]} "
                         f"and {x2n.shape[1:]}")
    if x1n.dtype != x2n.dtype:
        dt = np.promote_types(x1n.dtype, x2n.dtype)
        x1n, x2n = x1n.astype(dt), x2n.astype(dt)
    return x1n, x2n


def _write_tile(dest, leaf_vals, a, b, t1, t2, n1, n2, sym):
    """Tile ``(a, b)`` into ``dest`` (and mirrored at ``(b, a)`` when symmetric)."""
    ra, rb = min(t1, n1 - a), min(t2, n2 - b)
    for k, v in enumerate(leaf_vals):
        v = np.asarray(v)[:ra, :rb]
        if sym and a == b:
            v = _mirror(v)
        dest[k][a:a + ra, b:b + rb] = v
        if sym and a != b:
            dest[k][b:b + rb, a:a + ra] = _transpose(v)


class _MemorySink:
    """Tiles into ``(n1, n2, ...)`` arrays held in memory."""

    def __init__(self, result):
        self.result = result
        self.done: set = set()

    def put(self, g, vals, a, b, geom):
        _write_tile(self.result, vals, a, b, *geom)


class _StreamSink:
    """Tiles into the ``.npy`` memory map ``out``, each listed in the manifest once flushed."""

    def __init__(self, out, shape, dtype, fp, t, sym, n_tiles, pidx, pcount, done):
        self.out, self.shape, self.dtype, self.fp = out, shape, dtype, fp
        self.t, self.sym, self.n_tiles, self.pidx, self.pcount = t, sym, n_tiles, pidx, pcount
        self.done = done
        self.mdone = sorted(g for g in done if g % pcount == pidx)
        self.manifest = _manifest_path(out, pidx, pcount)

    def put(self, g, vals, a, b, geom):
        mm = np.load(self.out, mmap_mode="r+")
        _write_tile(mm, vals, a, b, *geom)
        mm.flush()
        del mm
        self.mdone.append(g)
        io.write_json(self.manifest, _manifest(self.fp, self.shape, self.t, self.sym,
                                               self.n_tiles, self.pidx, self.pcount,
                                               self.mdone))

    def close(self, treedef, n_tiles):
        """The memory-mapped result, or None while other processes have tiles to do."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ntkexp-tiling-done")
        _, all_done = _open_stream(self.out, self.shape, self.dtype, self.fp, None)
        if len(all_done) < n_tiles:
            return None
        mm = np.load(self.out, mmap_mode="r")
        return jax.tree_util.tree_unflatten(treedef, [mm[k] for k in range(self.shape[0])])


def _open_sink(out, fn, x1n, x2n, args, fingerprint, plan, leaves, pidx, pcount,
               memory_budget, concurrent):
    """``(stream sink, plan)``: the kernel file created or reopened (resuming on the grid
    of its finished tiles when that fits the budget); process 0 creates it."""
    sym = x2n is None
    trails = {tuple(leaf.shape[2:]) for leaf in leaves}
    dtypes = {np.dtype(leaf.dtype) for leaf in leaves}
    if len(trails) != 1 or len(dtypes) != 1:
        raise ValueError("streaming needs every output leaf to share shape and dtype")
    shape = (len(leaves), plan.n1, plan.n2) + next(iter(trails))
    dtype = next(iter(dtypes))
    fp = fingerprint_of(fn, x1n, x2n, args, fingerprint)
    real_multi = jax.process_count() > 1
    if real_multi and pidx != 0:
        multihost_utils.sync_global_devices("ntkexp-tiling-create")
    first = _manifest(fp, shape, plan.tile, sym, len(plan.tiles), pidx, pcount, [])
    stored_tile, done = _open_stream(out, shape, dtype, fp,
                                     first if not real_multi or pidx == 0 else None)
    if real_multi and pidx == 0:
        multihost_utils.sync_global_devices("ntkexp-tiling-create")
    if stored_tile is not None and stored_tile != plan.tile:
        # resume on the grid of the finished tiles, if it fits the budget
        try:
            plan = plan_tiles(fn, x1n, x2n, args=args, memory_budget=memory_budget,
                              tile_size=int(stored_tile), stream=True, concurrent=concurrent)
        except TilingError as e:
            raise TilingError(f"kernel file {out!r} was started with tiles of side "
                              f"{stored_tile}, which do not fit this memory_budget ({e}); "
                              "resume with a larger memory_budget (nothing was changed)") \
                from None
    return _StreamSink(out, shape, dtype, fp, plan.tile, sym, len(plan.tiles), pidx, pcount,
                       done), plan


def _run_tiles(jfn, plan, x1n, x2n, args, sym, devs, mine, sink, *, quiet, on_tile, desc):
    """Compute the tiles ``mine``, one per device at a time, each handed to ``sink``."""
    t = plan.tile
    t1, t2 = min(t, plan.n1), min(t, plan.n2)
    geom = (t1, t2, plan.n1, plan.n2, sym)
    bar = None
    if not quiet and mine:
        bar = tqdm(total=len(mine), unit="tile", desc=f"{desc} ({t1}x{t2})", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    try:
        finished = 0
        for s in range(0, len(mine), len(devs)):
            pending = []
            for g, dev in zip(mine[s:s + len(devs)], devs, strict=False):
                a, b = plan.tiles[g]
                xa, xb = _pad(x1n, a, t1), _pad(x2n, b, t2)
                dargs = args
                if dev is not None:
                    xa, xb = jax.device_put(xa, dev), jax.device_put(xb, dev)
                    dargs = jax.device_put(args, dev)
                # a diagonal tile of a symmetric kernel is itself a kernel of one set
                # (x2=None), so self-pairs get the kernel's exact x2=None treatment
                pending.append((g, jfn(xa, None if sym and a == b else xb, *dargs)))
            for g, res in pending:
                a, b = plan.tiles[g]
                sink.put(g, [np.asarray(v) for v in jax.tree_util.tree_leaves(res)], a, b, geom)
                del res
                finished += 1
                if bar is not None:
                    bar.update(1)
                if on_tile is not None:
                    on_tile(finished, len(mine))
    finally:
        if bar is not None:
            bar.close()


def kernel_budget(cfg) -> int:
    """``kernels.memory_budget`` of a run config (the default when the section is absent)."""
    sec = getattr(cfg, "kernels", None)
    value = getattr(sec, "memory_budget", None) if sec is not None else None
    return parse_bytes(DEFAULT_MEMORY_BUDGET if value is None else value)


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "TilePlan",
    "TilingError",
    "fingerprint_of",
    "kernel_budget",
    "parse_bytes",
    "plan_tiles",
    "tiled_kernel",
]

