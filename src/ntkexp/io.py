"""Atomic writes of run outputs.

Every file a run produces is written to a temporary name in the same folder and
then moved into place with ``os.replace`` (atomic on POSIX), so a run that is
killed mid-way never leaves a truncated ``results.npz``, ``summary.json`` or
unit file behind: each path either holds a complete file or does not exist.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import yaml


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str, data: bytes) -> str:
    """Atomically write ``data`` to ``path``; returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_text(path: str, text: str) -> str:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def _jsonable(obj: Any):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):
        return _jsonable(np.asarray(obj))
    return obj


def write_json(path: str, obj: Any) -> str:
    """Atomically write ``obj`` (numpy scalars/arrays allowed) as indented JSON."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """Atomically write one JSON object per line."""
    return write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))


def write_yaml(path: str, obj: Any) -> str:
    """Atomically write ``obj`` as YAML (block style, key order kept)."""
    return write_text(path, yaml.safe_dump(_jsonable(obj), sort_keys=False))


def write_npz(path: str, arrays: Mapping[str, Any]) -> str:
    """Atomically write a dict of arrays as an (uncompressed) ``.npz``."""
    buf = _io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return write_bytes(path, buf.getvalue())


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` into memory (the file is closed afterwards)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
