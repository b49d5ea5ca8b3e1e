"""The project stands on its own: its docs cite only files inside the repository.

Scans README.md, docs/, the gallery pages (experiments/*/README.md), the config
headers, and every source file under src/ and benchmarks/ (docstrings and
comments) for

* references to places outside the repository (absolute paths such as
  ``/work/...``, files such as a design document that is not here, ``../``
  leaving the repository), and
* repository paths that do not exist (``tests/kernels/test_x.py``,
  ``docs/missing.md``, a ``file.py::test_name`` whose test is gone),

and fails listing every offending file, line and path.
"""

import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache",
             ".hypothesis", "node_modules"}
EXTS = r"md|py|yaml|yml|json|jsonl|npz|png|pdf|txt|toml|cfg|csv|npy|sh"
# a path-like token: optional folders, a file name with a known extension, an
# optional ``::test_name``
PATH_RE = re.compile(r"(?<![\w/.:-])((?:\.{1,2}/|[\w.-]+/)*[\w.*-]+\.(?:" + EXTS + r"))"
                     r"(?:::(\w+))?(?![\w/])")
# folders written without a file name (``tests/kernels/data/``, ``docs/``)
DIR_RE = re.compile(r"(?<![\w/.:-])((?:src|tests|docs|configs|benchmarks|experiments|\.ci)"
                    r"(?:/[\w.-]+)*/)(?![\w*])")
OUTSIDE_RE = re.compile(r"(?<![\w.])/(?:work|home|Users|mnt|opt|srv|data|scratch)/[\w./-]*"
                        r"|\bshared/(?:reference|papers|DESIGN)[\w./-]*|\bDESIGN\.md\b")
URL_RE = re.compile(r"\w+://\S+")
# files a run writes (run-folder layout, docs/conventions.md) or a user makes:
# named in the docs, never in the repository
GENERATED = {"config.yaml", "meta.json", "results.npz", "metrics.jsonl", "summary.json",
             "timings.json", "results.json", "my_config.yaml", "plugin.py", "my_plugin.py",
             # example output names of tiled kernels and benchmarks
             "k.npy", "x.npy", "k.npy.manifest.json", ".manifest.json", "cfg.yaml",
             "bench_tiling.partial.jsonl"}
GENERATED_PREFIXES = ("runs/", "RUN_DIR/", "OUT/", "figures/", "units/", "bench/", "/tmp/",
                      "out_dir/", "fig_dir/")
# placeholders for a user's own files (my.npz, my_nets.py, configs/X.yaml, mnist.npz)
PLACEHOLDER_RE = re.compile(r"^(?:my\w*|X|mnist)\.")


def _walk(top, exts):
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for f in filenames:
            if f.endswith(exts):
                yield os.path.join(dirpath, f)


def _repo_files():
    return [os.path.relpath(p, ROOT) for p in _walk(ROOT, ("",))]


FILES = _repo_files()
BASENAMES = {os.path.basename(f) for f in FILES}


def _scanned():
    out = [os.path.join(ROOT, "README.md")]
    out += list(_walk(os.path.join(ROOT, "docs"), (".md",)))
    out += list(_walk(os.path.join(ROOT, "experiments"), (".md",)))
    out += list(_walk(os.path.join(ROOT, "configs"), (".yaml", ".yml")))
    out += list(_walk(os.path.join(ROOT, "src"), (".py",)))
    out += list(_walk(os.path.join(ROOT, "benchmarks"), (".py", ".md")))
    return sorted(out)


def _exists(path, here):
    """Does ``path`` name something in the repository (from the root or from ``here``)?"""
    if "*" in path:
        import glob

        return any(glob.glob(os.path.join(base, path))
                   for base in (ROOT, here, os.path.join(ROOT, "src", "ntkexp")))
    for base in (ROOT, here, os.path.join(ROOT, "src", "ntkexp"), os.path.join(ROOT, "src")):
        full = os.path.normpath(os.path.join(base, path))
        if not (full == ROOT or full.startswith(ROOT + os.sep)):
            continue  # leaves the repository
        if os.path.exists(full):
            return True
    return False


def _prose_lines(source: str) -> list[str]:
    """The lines of a Python source with only its strings (docstrings included) and
    comments kept, so code (``self.cfg``) is not read as a file name."""
    lines = [""] * (source.count("\n") + 1)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT) or \
                tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            for k, part in enumerate(tok.string.split("\n")):
                lines[tok.start[0] - 1 + k] += " " + part
    return lines


def _problems(path):
    here = os.path.dirname(path)
    rel = os.path.relpath(path, ROOT)
    bad = []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = _prose_lines(text) if path.endswith(".py") else text.splitlines()
    for no, line in enumerate(lines, 1):
        text = URL_RE.sub("", line)
        for m in OUTSIDE_RE.finditer(text):
            bad.append(f"{rel}:{no}: outside the repository: {m.group(0)}")
        for m in PATH_RE.finditer(text):
            p, test = m.group(1), m.group(2)
            name = os.path.basename(p)
            if p.startswith(GENERATED_PREFIXES) or name in GENERATED or PLACEHOLDER_RE.match(name):
                continue
            if "/" not in p:
                # a bare file name: it must exist somewhere in the repository
                if p not in BASENAMES and "*" not in p:
                    bad.append(f"{rel}:{no}: no such file in the repository: {p}")
                continue
            if not _exists(p, here):
                bad.append(f"{rel}:{no}: no such path in the repository: {p}")
            elif test is not None:
                target = next((os.path.join(b, p) for b in (ROOT, here)
                               if os.path.isfile(os.path.join(b, p))), None)
                if target is not None:
                    with open(target, encoding="utf-8") as t:
                        if not re.search(rf"\bdef {test}\b", t.read()):
                            bad.append(f"{rel}:{no}: {p} has no test {test}")
        for m in DIR_RE.finditer(text):
            if not _exists(m.group(1), here):
                bad.append(f"{rel}:{no}: no such folder in the repository: {m.group(1)}")
    return bad


def test_docs_cite_only_files_inside_the_repository():
    bad = [b for path in _scanned() for b in _problems(path)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_what_it_should(tmp_path):
    """The scan itself can fail: each kind of bad citation is reported."""
    doc = tmp_path / "doc.md"
    doc.write_text("see DESIGN.md and /work/shared/reference/README.md\n"
                   "and shared/reference/README.md, tests/kernels/test_quadrature.py,\n"
                   "../../outside.md, tests/test_docs.py::test_gone, docs/nope/\n"
                   "fine: tests/test_docs.py, docs/conventions.md, runs/x/summary.json\n",
                   encoding="utf-8")
    bad = _problems(str(doc))
    text = "\n".join(bad)
    for needle in ("DESIGN.md", "/work/shared/reference/README.md",
                   "shared/reference/README.md", "test_quadrature.py", "outside.md",
                   "test_gone", "docs/nope/"):
        assert needle in text, (needle, text)
    assert not any(":4:" in b for b in bad), bad
