"""Command line: argument parsing and printing only; the work is done by ``shrink``.

Exit codes: 0 ok, 1 validation failed, 2 usage or input error, 130 interrupted (Ctrl-C), 143
terminated (SIGTERM). Errors are one line on stderr (a traceback only with --debug). SIGTERM is
turned into an exception while ``main`` runs, so temporary files are removed as on Ctrl-C (output
files are written atomically: a run stopped early leaves nothing behind).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from .errors import OnnxShrinkError, UsageError, first_line
from .pipeline import profile_table
from .report import console_table, to_json
from .validate import Tolerances


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="onnxshrink", description="Make trained ONNX models smaller and faster by rewriting their graphs.")
    p.add_argument("input", nargs="?", help="input model (.onnx); never modified")
    p.add_argument("output", nargs="?", help="output model path (written atomically)")
    p.add_argument("--passes", help="comma-separated passes, run in order (see --list-passes)")
    p.add_argument("--calibration-data", metavar="PATH", help=".npz keyed by input name, .npy, or an image folder")
    p.add_argument("--validation-data", metavar="PATH", help="held-out data (default: last 20%% of the calibration data)")
    p.add_argument("--random-calibration", type=int, metavar="N", help="use N random inputs as calibration data (warns)")
    p.add_argument("--image-size", metavar="H,W", help="image folder: resize to H,W")
    p.add_argument("--mean", metavar="M[,M,M]", help="image folder: mean subtracted after scaling to [0,1]")
    p.add_argument("--std", metavar="S[,S,S]", help="image folder: std divided after subtracting the mean")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="image folder: tensor layout")
    p.add_argument("--target-flops", metavar="F", help="FLOPs of the result as a fraction of the original (0 < F <= 1)")
    p.add_argument("--target-params", metavar="F", help="parameters of the result as a fraction of the original")
    p.add_argument("--target-size", metavar="F", help="bytes of the result as a fraction of the original (pq)")
    p.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE", help="pass option (repeatable)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--max-error", type=float, help="fail if any output's max abs error exceeds this")
    p.add_argument("--max-rel-l2", type=float, help="fail if any output's relative L2 error exceeds this")
    p.add_argument("--min-cosine", type=float, default=0.9, help="fail if any output's cosine is below this (default 0.9)")
    p.add_argument("--min-top1", type=float, help="fail if top-1 agreement of a 2-D output is below this")
    p.add_argument("--force", action="store_true", help="write even if validation fails or a target is missed; allow OUT == IN")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    p.add_argument("--inspect", action="store_true", help="print a per-layer table of INPUT and which passes apply")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--profile", action="store_true", help="print where each pass spent its time (calibration "
                   "inference and runs, statistics, session creation, fitting, search, export)")
    return p


def _floats(text, flag):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, got '{text}'") from None


def _image_size(text):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise UsageError(f"--image-size expects H,W (two positive integers), got '{text}'")
    return h, w


def parse_sets(items) -> dict:
    options = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UsageError(f"--set expects PASS.KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        pass_name, opt = key.split(".", 1)
        options.setdefault(pass_name.strip(), {})[opt.strip()] = value.strip()
    return options


def list_passes() -> str:
    from .registry import all_passes
    lines = []
    for name, cls in sorted(all_passes().items()):
        status = "" if cls.ready else " [not built yet]"
        extra = []
        if cls.needs_data:
            extra.append("needs calibration data")
        if cls.budgets:
            extra.append("budgets: " + ",".join(cls.budgets))
        lines.append(f"{name:10} {cls.summary}{status}" + (f" ({'; '.join(extra)})" if extra else ""))
    return "\n".join(lines)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread; a BaseException so that no ``except Exception`` on the
    way up turns it into an ordinary error."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM during clean-up kills at once
    raise _Terminated()


def main(argv=None) -> int:
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        installed = True
    except ValueError:   # not the main thread: leave signals alone
        installed = False
    try:
        return _run(argv)
    finally:
        if installed:    # None: a handler not set from Python; the default is the closest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(argv) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return _main(argv)
    except _Terminated:
        print("onnxshrink: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except OnnxShrinkError as e:
        if debug:
            raise
        print(f"onnxshrink: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxshrink: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, unless --debug
        if debug:
            raise
        print(f"onnxshrink: internal error: {type(e).__name__}: {first_line(e)} "
              "(rerun with --debug for a traceback)", file=sys.stderr)
        return 2


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.list_passes:
        print(list_passes())
        return 0
    if args.inspect:
        if not args.input:
            raise UsageError("--inspect needs a model path")
        from .inspect import inspect_model
        print(inspect_model(args.input, args.passes, parse_sets(args.set)))
        return 0
    if not args.input or not args.output:
        raise UsageError("usage: onnxshrink IN OUT --passes a,b,... (see --help)")
    if not args.passes:
        raise UsageError("--passes is required (see --list-passes)")
    from .model_io import check_output_path
    from .pipeline import shrink
    if not os.path.isfile(args.input) and os.path.exists(args.input):
        raise UsageError(f"input '{args.input}' is not a file")
    check_output_path(args.output, args.input, force=args.force)
    image_options = {k: v for k, v in {
        "image_size": _image_size(args.image_size),
        "mean": _floats(args.mean, "--mean"), "std": _floats(args.std, "--std"), "layout": args.layout,
    }.items() if v is not None}
    tol = Tolerances(max_error=args.max_error, min_cosine=args.min_cosine, min_top1=args.min_top1,
                     max_rel_l2=args.max_rel_l2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.quiet else "default")
        warnings.showwarning = lambda m, *a, **k: print(f"onnxshrink: warning: {m}", file=sys.stderr)
        try:
            result = shrink(args.input, args.passes, calibration=args.calibration_data,
                            validation=args.validation_data, target_flops=args.target_flops,
                            target_params=args.target_params, target_bytes=args.target_size,
                            options=parse_sets(args.set), tolerances=tol, image_options=image_options,
                            random_calibration=args.random_calibration, force=args.force,
                            quiet=args.quiet, batch_size=args.batch_size, seed=args.seed)
        except OnnxShrinkError as e:
            partial = getattr(e, "result", None)
            if partial is not None:
                partial.close()   # its model is not needed: only the report is written
                if args.report:
                    _write_report(args.report, partial.report)
                if not args.quiet:
                    print(console_table(partial.report))
            raise
    with result:
        result.save(args.output)
    if args.profile:
        print(profile_table(result.report))
    if args.report:
        _write_report(args.report, result.report)
    if not args.quiet:
        print(console_table(result.report))
        print(f"wrote {args.output}")
    return 0


def _write_report(path, report):
    from .model_io import atomic_write_text
    atomic_write_text(path, to_json(report))


if __name__ == "__main__":
    sys.exit(main())
