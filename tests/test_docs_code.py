"""Every code block of docs/*.md runs.

One fresh Python process per page (the plug-ins a page registers stay out of the
test process) runs the page's blocks in order, in a temporary folder that is on
``sys.path``:

* ``python``: executed in one namespace shared by the page's blocks, which starts
  with small inputs the snippets name (``x1 (4, 3)``, ``x2 (3, 3)``, ``x``,
  ``x_train``, ``x_test``, ``key``, ``spec``, ``apply_fn``, ``params``). A block
  whose first line is ``# name.py`` is written to that file and imported (a
  plug-in module), as a user would.
* ``yaml``: parsed; a whole config (it names an ``experiment``) is written
  (``# name.yaml`` on its first line names the file) and checked by
  ``ntkexp validate``; a single section (``model:``, ``distributed:``, ...) is
  put into a small valid config and checked the same way.
* ``json``: parsed (a ``"key": value`` fragment inside braces).
* ``bash``: each ``ntkexp`` command (continuation lines joined, shell
  variables given a value) is parsed by the CLI; ``ntkexp run`` and ``ntkexp
  validate`` commands run ``ntkexp validate`` on the same config, preset and
  ``--set`` overrides (the check pass ``run`` does before any work), ``ntkexp
  list`` runs. Commands that install packages, need a GPU (``gpu-check``) or a
  cluster launcher (``srun``, ``#SBATCH``) are parsed only: they are named in
  the test's output.

Blocks without a language are sample output (error lines, folder listings) and
are not run. ``docs/extending.md`` (about 20 s) runs in the fast suite, the other
pages in ``make test-slow``.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
              if f.endswith(".md"))
FENCE = re.compile(r"^```(\w*)\s*\n(.*?)^```\s*$", re.M | re.S)


def blocks(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


RUNNER = r'''
import json, os, shlex, sys, re, copy
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, yaml
jax.config.update("jax_numpy_rank_promotion", "allow")
import ntkexp as nx
import ntkexp.experiments
from ntkexp.cli import main

ROOT, blocks = sys.argv[1], json.load(open(sys.argv[2]))
sys.path.insert(0, os.getcwd())
BASE = {"experiment": "kernel_convergence",
        "model": {"arch": "mlp", "depth": 1, "width": [8], "b_std": 0.1},
        "data": {"name": "sphere", "n_train": 4, "dim": 3},
        "train": {"optimizer": "gd", "learning_rate": 0.5, "steps": 1, "inits": 1},
        "params": {"mc_width": 16, "mc_samples": 2, "mc_batch": 2}}
k = jax.random.split(jax.random.key(0), 4)
spec = nx.MLPSpec(depth=1, width=32, activation="relu", b_std=0.1)
x1 = jax.random.normal(k[0], (4, 3)); x2 = jax.random.normal(k[1], (3, 3))
ns = {"x1": x1, "x2": x2, "x": x1, "x_train": x1, "x_test": x2, "key": k[2], "spec": spec,
      "apply_fn": nx.MLPApply(spec), "params": nx.init_params(spec, 3, k[3]),
      "__name__": "__docs__"}

def check(code, argv):
    if code != 0:
        raise SystemExit(f"exit {code} from ntkexp {' '.join(argv)}")

def validate(path, extra=()):
    argv = ["validate", path, *extra]
    check(main(argv), argv)

def file_name(text):
    first = text.splitlines()[0].strip() if text.strip() else ""
    return re.match(r"#\s*([\w.]+\.(py|yaml))$", first)

for lang, text in blocks:  # a page's plug-in modules exist before its first command
    m = file_name(text)
    if lang == "python" and m and m.group(2) == "py":
        open(m.group(1), "w").write(text)

for i, (lang, text) in enumerate(blocks):
    named = file_name(text)
    print(f"-- block {i} ({lang or 'output'})", flush=True)
    if lang == "python":
        if named and named.group(2) == "py":
            __import__(named.group(1)[:-3])
        else:
            exec(compile(text, f"block {i}", "exec"), ns)
    elif lang == "yaml":
        d = yaml.safe_load(text)
        assert isinstance(d, dict), d
        if "experiment" not in d:
            d = {**copy.deepcopy(BASE), **d}
            if "model" in d and d["model"].get("arch") == "layers":
                d["model"].setdefault("width", [8])
        name = named.group(1) if named and named.group(2) == "yaml" else f"block{i}.yaml"
        open(name, "w").write(yaml.safe_dump(d))
        validate(name)
    elif lang == "json":
        t = text.strip()
        json.loads(t if t.startswith(("{", "[")) else "{" + t + "}")
    elif lang == "bash":
        joined = re.sub(r"\\\n\s*", " ", text)
        for line in joined.splitlines():
            line = line.strip()
            line = line.replace("$PORT", "12345").replace("$i", "0").rstrip("&; ")
            words = shlex.split(line, comments=True) if line else []
            while words and re.match(r"^\w+=", words[0]):
                words = words[1:]
            if words[:1] == ["srun"]:
                print("   parsed only (cluster launcher):", line)
                words = words[1:]
                parse_only = True
            else:
                parse_only = False
            if not words or words[0] != "ntkexp":
                if words:
                    print("   not run (shell set-up):", line)
                continue
            argv = words[1:]
            if "[" in line and "]" in line and argv[0] == "gpu-check":
                print("   usage line, not run:", line)
                continue
            args = ntkexp.cli._parser().parse_args(argv)
            if args.cmd in ("run", "validate") and not parse_only:
                rest = []
                for flag in ("preset",):
                    if getattr(args, flag, None):
                        rest += [f"--{flag}", getattr(args, flag)]
                for ov in args.overrides:
                    rest += ["--set", ov]
                path = args.config if os.path.exists(args.config) else \
                    os.path.join(ROOT, args.config)
                validate(path, rest)
            elif args.cmd == "list":
                check(main(argv), argv)
            else:
                print("   parsed only:", line)
print("ok")
'''


#: Pages whose run takes longer (a tiled kernel, paper presets validated): make test-slow.
SLOW_PAGES = {"kernels_at_scale.md", "distributed.md", "gpu.md"}
PAGES = [pytest.param(p, id=os.path.basename(p),
                      marks=[pytest.mark.slow] if os.path.basename(p) in SLOW_PAGES else [])
         for p in DOCS if any(lang for lang, _ in blocks(p))]  # pages with code blocks


def test_the_docs_have_code_blocks_to_run():
    assert len(PAGES) >= 2, PAGES


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_of_the_page_runs(page, tmp_path):
    code = [(lang, text) for lang, text in blocks(page) if lang]
    (tmp_path / "blocks.json").write_text(json.dumps(code))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, str(tmp_path / "runner.py"), ROOT,
                        str(tmp_path / "blocks.json")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), \
        f"{os.path.basename(page)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def test_the_block_finder_sees_every_fence():
    """Each page has an even number of fences and every one is in a found block."""
    for page in DOCS:
        with open(page, encoding="utf-8") as f:
            fences = sum(1 for line in f if line.startswith("```"))
        assert fences % 2 == 0, page
        assert len(blocks(page)) == fences // 2, page
