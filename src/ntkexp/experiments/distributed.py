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

Why the coordinator's key-value store and not collectives or shared files:
the store comes with ``jax.distributed.initialize`` on every backend (no
``gloo`` CPU collectives to switch on, no device buffers of equal shapes on
every process), and it needs no file system shared between the machines. Values
are split into 1 MiB pieces. Failures do not hang: a process whose unit raises
publishes the error, and process 0 stops with it; a process that dies is
noticed by the runtime's heartbeats. ``docs/distributed.md`` says how to launch.
"""

from __future__ import annotations

import io as _io
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

_PIECE = 1 << 20
_WAIT_S = 30 * 24 * 3600.0  # no deadline of our own: the runtime's heartbeats catch dead peers


class Cluster(NamedTuple):
    """This process's place in the run: ``index`` of ``count`` processes."""

    index: int
    count: int
    client: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def current() -> Cluster:
    """The running cluster (``count == 1`` when ``jax.distributed`` is not initialised)."""
    import jax

    if not jax.distributed.is_initialized():
        return Cluster(0, 1)
    from jax._src import distributed as _dist

    client = getattr(_dist.global_state, "client", None)
    count, index = jax.process_count(), jax.process_index()
    if count > 1 and client is None:
        raise RuntimeError("jax.distributed is initialised but has no key-value client")
    return Cluster(index, count, client)


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


def _put(client, key: str, blob: bytes) -> None:
    pieces = [blob[i:i + _PIECE] for i in range(0, len(blob), _PIECE)] or [b""]
    for i, piece in enumerate(pieces):
        client.key_value_set_bytes(f"{key}/{i}", piece)
    client.key_value_set(f"{key}/n", str(len(pieces)))


def _get(client, key: str, timeout_s: float = _WAIT_S) -> bytes:
    ms = int(min(timeout_s, 2**31 // 1000 - 1) * 1000)
    n = int(client.blocking_key_value_get(f"{key}/n", ms))
    return b"".join(client.blocking_key_value_get_bytes(f"{key}/{i}", ms) for i in range(n))


def _try_get(client, key: str) -> bytes | None:
    try:
        n = client.key_value_try_get(f"{key}/n")
    except Exception:  # noqa: BLE001 - not there (yet)
        return None
    return b"".join(client.key_value_try_get_bytes(f"{key}/{i}") for i in range(int(n)))


def broadcast(cluster: Cluster, key: str, obj: Any = None) -> Any:
    """Process 0's ``obj`` (JSON-able) on every process."""
    if cluster.count == 1:
        return obj
    if cluster.is_main:
        _put(cluster.client, key, json.dumps(obj).encode())
        return obj
    return json.loads(_get(cluster.client, key).decode())


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
    """Publish this process's outputs ``{unit file name: {field: array}}`` for process 0."""
    _put(cluster.client, f"{key}/done/{cluster.index}", _pack(outs))


def send_failure(cluster: Cluster, key: str, message: str) -> None:
    """Tell process 0 that this process failed (so it stops instead of waiting)."""
    import contextlib

    with contextlib.suppress(Exception):
        cluster.client.key_value_set(f"{key}/failed/{cluster.index}", message)


class PeerError(RuntimeError):
    """Another process of the run failed; the message is its error."""


def receive(cluster: Cluster, key: str, poll_s: float = 0.05,
            timeout_s: float = _WAIT_S) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """On process 0: every other process's outputs, ``{process: {unit file: fields}}``.

    Raises:
      PeerError: a process published a failure.
      TimeoutError: nothing came within ``timeout_s``.
    """
    pending = set(range(1, cluster.count))
    got: dict[int, dict] = {}
    t0 = time.monotonic()
    while pending:
        for p in sorted(pending):
            blob = _try_get(cluster.client, f"{key}/done/{p}")
            if blob is not None:
                got[p] = _unpack(blob)
                pending.discard(p)
                continue
            try:
                msg = cluster.client.key_value_try_get(f"{key}/failed/{p}")
            except Exception:  # noqa: BLE001 - no failure published
                msg = None
            if msg is not None:
                raise PeerError(f"process {p} failed: {msg}")
        if pending:
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"processes {sorted(pending)} sent nothing in {timeout_s} s")
            time.sleep(poll_s)
    return got


def finish(cluster: Cluster, key: str) -> None:
    """On process 0: tell the others the run folder is written."""
    if cluster.count > 1:
        cluster.client.key_value_set(f"{key}/finished", "1")


def wait_for_main(cluster: Cluster, key: str, poll_s: float = 0.05,
                  timeout_s: float = _WAIT_S) -> None:
    """On processes other than 0: wait until process 0 has finished (or failed).

    Raises:
      PeerError: process 0 published a failure.
    """
    t0 = time.monotonic()
    while True:
        for name, fail in (("finished", False), ("failed/0", True)):
            try:
                msg = cluster.client.key_value_try_get(f"{key}/{name}")
            except Exception:  # noqa: BLE001 - not there yet
                continue
            if fail:
                raise PeerError(f"process 0 failed: {msg}")
            return
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"process 0 did not finish in {timeout_s} s")
        time.sleep(poll_s)
