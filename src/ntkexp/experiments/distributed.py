"""Multi-process runs on JAX's multi-controller runtime (``jax.distributed``).

With ``distributed.enabled`` every process runs the same ``ntkexp run``
command; :func:`ntkexp.experiments.base.run` then

1. lets process 0 alone read the run folder's cache and publish the list of
   initialisations still to compute (:func:`broadcast`);
2. splits the units over ``jax.process_index()`` by :func:`assign` (longest
   first onto the least loaded process: the same answer on every process);
3. has every process compute its units; processes other than 0 send their
   per-initialisation outputs to process 0 (:func:`send` / :func:`receive`);
4. lets process 0 alone write the run folder (units, results, summary,
   figures and ``meta.json``, which records the number of processes and which
   units each computed).

How: JAX's public multi-host API (:mod:`jax.experimental.multihost_utils`):
every exchange is one :func:`~jax.experimental.multihost_utils.process_allgather`
of a status header (ok / failed, payload length) and then of the payloads
padded to the longest (CPU cross-process collectives, gloo, are on by default
since JAX 0.5.1), so the protocol is a fixed sequence of collectives that
every process joins: the todo broadcast, the outputs (send on the others,
receive on process 0) and the finish. Failures do not hang: a process whose
unit raises joins the next collective with its error as the payload, the
others raise :class:`PeerError` with that line (and join no further
collective); a process that dies breaks the collective (its sockets close),
which the others report as one :class:`PeerError` line. ``docs/distributed.md``
says how to launch.
"""

from __future__ import annotations

import atexit
import io as _io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

_OK, _FAILED = 0, 1
_state = {"aborted": False}  # a peer's failure is known here: join no further collective


def _hard_exit() -> None:
    """At exit after an aborted run: skip ``jax.distributed``'s shutdown barrier, which
    would wait for a dead peer (registered after JAX's own handler, so it runs first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _abort() -> None:
    if not _state["aborted"]:
        _state["aborted"] = True
        atexit.register(_hard_exit)


class Cluster(NamedTuple):
    """This process's place in the run: ``index`` of ``count`` processes."""

    index: int
    count: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def current() -> Cluster:
    """The running cluster (``count == 1`` when ``jax.distributed`` is not initialised)."""
    if not jax.distributed.is_initialized():
        return Cluster(0, 1)
    _state["aborted"] = False
    return Cluster(jax.process_index(), jax.process_count())


class PeerError(RuntimeError):
    """Another process of the run failed (or died); the message says which and why."""


def _allgather(a: np.ndarray) -> np.ndarray:
    try:
        return np.asarray(multihost_utils.process_allgather(a))
    except Exception as e:  # noqa: BLE001 - a peer died: the collective breaks
        _abort()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PeerError(f"lost contact with another process ({first[:200]})") from None


def _exchange(cluster: Cluster, status: int, blob: bytes) -> list[bytes]:
    """Every process's payload, ``[blob of process p]``; one status + one data allgather.

    Raises:
      PeerError: another process joined with a failure (its message) or died.
    """
    head = np.array([status, len(blob)], np.int32)
    heads = _allgather(head).reshape(cluster.count, 2)
    n = max(1, int(heads[:, 1].max()))
    buf = np.zeros(n, np.uint8)
    buf[:len(blob)] = np.frombuffer(blob, np.uint8)
    data = _allgather(buf).reshape(cluster.count, n)
    out = [data[p, :int(heads[p, 1])].tobytes() for p in range(cluster.count)]
    for p in range(cluster.count):
        if p != cluster.index and int(heads[p, 0]) == _FAILED:
            _abort()
            raise PeerError(f"process {p} failed: {out[p].decode(errors='replace')}")
    return out


def assign(work: Sequence[float], count: int) -> list[int]:
    """Owner process of each item: longest first onto the least loaded process.

    Deterministic (ties broken by item order and process number), so every
    process computes the same assignment.
    """
    load = [0.0] * count
    owner = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-float(work[i]), i)):
        p = min(range(count), key=lambda q: (load[q], q))
        owner[i] = p
        load[p] += float(work[i])
    return owner


def broadcast(cluster: Cluster, key: str, obj=None):
    """Process 0's ``obj`` (JSON-able) on every process (``key`` names the step)."""
    if cluster.count == 1:
        return obj
    blob = json.dumps(obj).encode() if cluster.is_main else b""
    return json.loads(_exchange(cluster, _OK, blob)[0].decode())


def _pack(outs: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    flat = {f"{name}|{k}": np.asarray(v) for name, o in outs.items() for k, v in o.items()}
    buf = _io.BytesIO()
    np.savez(buf, __names__=np.asarray(list(outs), dtype=object), **flat)
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, dict[str, np.ndarray]]:
    with np.load(_io.BytesIO(blob), allow_pickle=True) as z:
        out: dict[str, dict[str, np.ndarray]] = {str(n): {} for n in z["__names__"]}
        for k in z.files:
            if k == "__names__":
                continue
            name, field = k.split("|", 1)
            out[name][field] = z[k]
    return out


def send(cluster: Cluster, key: str, outs: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Hand this process's outputs ``{unit file name: {field: array}}`` to process 0
    (the collective process 0 joins with :func:`receive`)."""
    _exchange(cluster, _OK, _pack(outs))


def send_failure(cluster: Cluster, key: str, message: str) -> None:
    """Join the next collective with this failure (so the others stop instead of waiting);
    nothing when the failure came from a peer (it joins no further collective)."""
    if cluster.count == 1 or _state["aborted"]:
        return
    _abort()
    try:
        _exchange(cluster, _FAILED, message.encode())
    except PeerError:
        pass


def receive(cluster: Cluster, key: str) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """On process 0: every other process's outputs, ``{process: {unit file: fields}}``.

    Raises:
      PeerError: a process failed or died.
    """
    blobs = _exchange(cluster, _OK, b"")
    return {p: _unpack(blobs[p]) for p in range(1, cluster.count)}


def finish(cluster: Cluster, key: str) -> None:
    """On process 0: tell the others the run folder is written."""
    if cluster.count > 1:
        _exchange(cluster, _OK, b"")


def wait_for_main(cluster: Cluster, key: str) -> None:
    """On processes other than 0: wait until process 0 has finished (or failed).

    Raises:
      PeerError: process 0 failed or died.
    """
    _exchange(cluster, _OK, b"")
