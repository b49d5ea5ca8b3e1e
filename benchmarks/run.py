"""Run every ``benchmarks/bench_*.py`` (each exposes ``main(out_dir) -> dict``).

Usage: ``python -m benchmarks.run --out benchmarks/results [--only NAME]``.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", action="append", default=None,
                    help="run only bench_<NAME> (repeatable)")
    args = ap.parse_args()
    here = pathlib.Path(__file__).parent
    names = sorted(p.stem for p in here.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if n.removeprefix("bench_") in args.only or n in args.only]
    for name in names:
        mod = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}", flush=True)
        mod.main(args.out)


if __name__ == "__main__":
    main()
