"""What code computed a unit: the ntkexp version, the git commit (and whether the
tree was dirty), a hash of ntkexp's own sources and of each plug-in module's
source. :func:`code_fingerprint` goes into every unit's cache key
(``ntkexp.experiments.base.unit_hash``), so that after a fix to ntkexp or to a
plug-in a rerun recomputes instead of reusing stale units.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # src/ntkexp


def ntkexp_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("ntkexp")
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_PKG_DIR, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout ntkexp runs from (None, None outside git).

    ``dirty``: tracked files differ from the commit (untracked files are ignored).
    """
    head = _git("rev-parse", "HEAD")
    if not head:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip() or None, (bool(status.strip()) if status is not None else None)


def _hash_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.relpath(p, os.path.dirname(p)).encode())
        try:
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()[:16]


def _py_files(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        out += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return out


def package_source_hash() -> str:
    """Hash of every ``.py`` file of the ntkexp package (catches edits in a dirty tree
    and installs without git)."""
    return _hash_files(_py_files(_PKG_DIR))


def module_source_hash(name: str) -> str | None:
    """Hash of an imported module's source (a package: every ``.py`` file under it)."""
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None) if mod is not None else None
    if not path:
        return None
    if os.path.basename(path) == "__init__.py":
        return _hash_files(_py_files(os.path.dirname(path)))
    return _hash_files([path])


@functools.lru_cache(maxsize=1)
def _ntkexp_fingerprint() -> tuple:
    commit, dirty = git_state()
    return (ntkexp_version(), commit, dirty, package_source_hash())


def code_fingerprint(plugins: Sequence[str] = ()) -> dict:
    """The code identity of a run's units (a JSON-able dict).

    Keys: ``ntkexp`` (version), ``git_commit``, ``git_dirty``, ``source``
    (ntkexp's sources) and ``plugins`` ({module: source hash}). The ntkexp part
    is computed once per process; plug-in sources are hashed on every call.
    """
    version, commit, dirty, src = _ntkexp_fingerprint()
    return {"ntkexp": version, "git_commit": commit, "git_dirty": dirty, "source": src,
            "plugins": {p: module_source_hash(p) for p in plugins}}


def clear_cache() -> None:
    """Forget the ntkexp fingerprint (tests that change the version or sources)."""
    _ntkexp_fingerprint.cache_clear()
