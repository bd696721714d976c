"""Command line: argument parsing and printing only; the work is done by ``shrink``.

Exit codes (also in ``--help``): 0 ok; 1 a check failed (validation, or a missed --target-*),
model not written; 2 usage, input or output error (one line on stderr); 3 written anyway because
of --force although a check failed; 130 interrupted (Ctrl-C); 141 stdout closed early (``| head``);
143 terminated (SIGTERM). Errors are one line on stderr (a traceback only with --debug). SIGTERM is
turned into an exception while ``main`` runs, so temporary files are removed as on Ctrl-C (output
files are written atomically: a run stopped early leaves nothing behind).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import warnings

from . import __version__
from .arguments import Data, Run, Targets
from .errors import (EXIT_CHECK_FAILED, EXIT_FORCED, EXIT_OK, EXIT_USAGE, CheckFailed, OnnxShrinkError, UsageError,
                     first_line)
from .pipeline import profile_table
from .report import console_table, to_json
from .validate import Tolerances

EXIT_CODES = f"""exit codes:
  {EXIT_OK}    ok: the model (and --report) written
  {EXIT_CHECK_FAILED}    validation failed or a --target-* was missed: model not written (--report still is)
  {EXIT_USAGE}    usage, input or output error (one line on stderr): nothing written
  {EXIT_FORCED}    written anyway because of --force, although validation failed or a target was missed
  130  interrupted (Ctrl-C), 143 terminated (SIGTERM): nothing written
  141  standard output closed early (e.g. piped into head)"""

# API argument names in library messages -> the CLI's flags
_FLAGS = {"force=True": "--force", "target_flops": "--target-flops", "target_params": "--target-params",
          "target_size": "--target-size", "min_cosine": "--min-cosine", "min_top1": "--min-top1",
          "max_error": "--max-error", "max_rel_l2": "--max-rel-l2", "max_range_error": "--max-range-error",
          "min_worst_cosine": "--min-worst-cosine",
          "min_decision_iou": "--min-decision-iou", "max_drop": "--max-drop", "metric=": "--metric", "random_calibration=N": "--random-calibration N",
          "random_calibration": "--random-calibration", "batch_size": "--batch-size", "threads": "--threads",
          "calibration=": "--calibration-data PATH", "validation=": "--validation-data PATH"}
_FLAG_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(k) for k in sorted(_FLAGS, key=len, reverse=True)) + r")(?![\w])")


_UNSET = object()   # a tolerance flag not given


def tolerances(args) -> Tolerances | None:
    """The tolerances of the flags: those given over the gate ``--gate`` names; None when neither
    ``--gate`` nor a tolerance flag is given (the library's choice: the default gate, or with
    ``--metric`` and ``--max-drop`` the metric alone)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Tolerances)
             if getattr(args, f.name) is not _UNSET}
    if args.gate is None and not given:
        return None
    base = {"cosine-only": Tolerances.cosine_only, "metric": Tolerances.metric_only}.get(args.gate, Tolerances)()
    return dataclasses.replace(base, **given)


def _limit(text):
    """A tolerance flag's value: a number, or "none" to skip that check."""
    if text.strip().lower() == "none":
        return None
    return float(text)

def cli_message(msg: str) -> str:
    """A library message in the CLI's words: API argument names become flags."""
    return _FLAG_RE.sub(lambda m: _FLAGS[m.group(1)], msg)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="onnxshrink", description="Make trained ONNX models smaller and faster by rewriting their graphs.",
                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"onnxshrink {__version__}")
    p.add_argument("input", nargs="?", help="input model (.onnx); never modified")
    p.add_argument("output", nargs="?", help="output model path (written atomically)")
    p.add_argument("--passes", help="comma-separated passes, run in order (see --list-passes)")
    p.add_argument("--calibration-data", metavar="PATH", help=".npz keyed by input name, .npy, a folder of .npz feeds (one each), or an image folder")
    p.add_argument("--validation-data", metavar="PATH", help="held-out data (default: last 20%% of the calibration data)")
    p.add_argument("--random-calibration", type=int, metavar="N", help="use N random inputs as calibration data (warns)")
    p.add_argument("--image-size", metavar="H,W", help="image folder: resize to H,W")
    p.add_argument("--mean", metavar="M[,M,M]", help="image folder: mean subtracted after scaling to [0,1]")
    p.add_argument("--std", metavar="S[,S,S]", help="image folder: std divided after subtracting the mean")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="image folder: tensor layout")
    p.add_argument("--channel-order", choices=["RGB", "BGR"], help="image folder: channel order (default RGB)")
    p.add_argument("--scale", type=int, choices=[1, 255],
                   help="image folder: mean/std apply to pixels scaled to 0-1 (1, default) or kept 0-255 (255)")
    p.add_argument("--max-side", type=int, metavar="N",
                   help="image folder, dynamic H/W: longest side at most N (default 960); aspect kept")
    p.add_argument("--size-multiple", type=int, metavar="M",
                   help="image folder, dynamic H/W: each side rounded to a multiple of M (default 32)")
    p.add_argument("--target-flops", metavar="F", help="FLOPs of the result as a fraction of the original (0 < F <= 1)")
    p.add_argument("--target-params", metavar="F", help="parameters of the result as a fraction of the original")
    p.add_argument("--target-size", metavar="F", help="bytes of the result as a fraction of the original (pq)")
    p.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE", help="pass option (repeatable)")
    p.add_argument("--keep", action="append", default=None, metavar="NODE",
                   help="leave this node as it is in every pass: a node name or a shell-style pattern such as "
                        "'/decoder/*' (repeatable; a pattern that names no node is an error)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--max-error", type=_limit, default=_UNSET, metavar="X|none",
                   help="fail if any output's max abs error exceeds this (default: off)")
    d = Tolerances()   # the default gate; a flag not given keeps its default (or --gate cosine-only's)
    p.add_argument("--gate", choices=["default", "cosine-only", "metric"], default=None,
                   help="the set of validation checks the flags below start from: default (the gate chosen on the "
                        "real-model zoo; used unless --metric and --max-drop are given), cosine-only (the former "
                        "lenient default: --min-cosine 0.9 alone) or metric (no output threshold: --metric with "
                        "--max-drop judges; the default when both are given and no tolerance flag is)")
    p.add_argument("--max-rel-l2", type=_limit, default=_UNSET, metavar="X|none",
                   help=f"fail if an output's relative L2 error exceeds this (default {d.max_rel_l2}; not for "
                        "probability outputs)")
    p.add_argument("--min-cosine", type=_limit, default=_UNSET, metavar="X|none",
                   help=f"fail if an output's cosine is below this (default {d.min_cosine}; not for probability outputs)")
    p.add_argument("--min-top1", type=_limit, default=_UNSET, metavar="X|none",
                   help="fail if the top-1 agreement of a probability distribution over the last axis is below this "
                        f"(default {d.min_top1})")
    p.add_argument("--max-range-error", type=_limit, default=_UNSET, metavar="X|none",
                   help="fail if an output's max abs error exceeds this fraction of its range (1 for probabilities; "
                        f"default {d.max_range_error})")
    p.add_argument("--min-worst-cosine", type=_limit, default=_UNSET, metavar="X|none",
                   help="fail if the worst sample's cosine of an output of >= 32 values a sample is below this "
                        f"(default {d.min_worst_cosine})")
    p.add_argument("--min-decision-iou", type=_limit, default=_UNSET, metavar="X|none",
                   help="fail if, for a score output (a Sigmoid gives it), the IoU of its values above 0.5 in the "
                        "original and in the result is below this, judged when at least 10 are above 0.5 "
                        f"(default {d.min_decision_iou})")
    p.add_argument("--metric", metavar="NAME|FILE.py:FN|MODULE:FN",
                   help="task metric, higher is better, evaluated on the validation feeds for the original and the "
                        "result: top1, cosine, rel_l2, mse, or fn(outputs_per_feed, feeds) -> float of your own")
    p.add_argument("--max-drop", type=float, metavar="D",
                   help="fail if the metric drops by more than D (absolute); without a target, search the "
                        "smallest model within D")
    p.add_argument("--force", action="store_true", help="write even if validation fails or a target is missed (exit code 3); allow OUT == IN")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="workers for independent solves while fitting (default: the usable cores); the model "
                        "written is the same for every N (one BLAS thread per solve)")
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    p.add_argument("--inspect", action="store_true", help="print a per-layer table of INPUT and which passes apply")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables (warnings and failures are still printed)")
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


def _image_options(args) -> dict:
    return {k: v for k, v in {
        "image_size": _image_size(args.image_size),
        "mean": _floats(args.mean, "--mean"), "std": _floats(args.std, "--std"), "layout": args.layout,
        "channel_order": args.channel_order, "scale": args.scale, "max_side": args.max_side,
        "size_multiple": args.size_multiple,
    }.items() if v is not None}


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
        extra = []
        if cls.requires.data:
            extra.append("needs calibration data")
        if cls.requires.opsets is not None:
            lo, hi = cls.requires.opsets
            extra.append(f"opsets {lo if lo is not None else ''}-{hi if hi is not None else ''}")
        if cls.budgets:
            extra.append("budgets: " + ",".join(cls.budgets))
        lines.append(f"{name:10} {cls.summary}" + (f" ({'; '.join(extra)})" if extra else ""))
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
        try:
            code = _run(argv)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            return _pipe_closed()
    finally:
        if installed:    # None: a handler not set from Python; the default is the closest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _pipe_closed() -> int:
    """stdout was closed by its reader (``| head``): stop quietly. Later writes, and the flush at
    exit, go to /dev/null instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # not a real file (captured in tests)
        pass
    return 141


def _error(msg: str) -> None:
    print(f"onnxshrink: error: {cli_message(msg)}", file=sys.stderr)


def _run(argv) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return _main(argv)
    except _Terminated:
        print("onnxshrink: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except SystemExit as e:          # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except CheckFailed as e:
        if debug:
            raise
        _error(f"{e.detail} (model not written; --force writes it anyway)")
        return e.exit_code
    except OnnxShrinkError as e:
        if debug:
            raise
        _error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxshrink: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except OSError as e:              # no space, permissions, ...: the path and the OS's words
        if debug:
            raise
        where = e.filename if e.filename is not None else "?"
        _error(f"{where}: {e.strerror or first_line(e)}")
        return EXIT_USAGE
    except Exception as e:  # a bug: still one line, unless --debug
        if debug:
            raise
        print(f"onnxshrink: internal error: {type(e).__name__}: {first_line(e)} "
              "(rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_USAGE


def _may_be_external(path) -> bool:
    """Whether the output will probably be saved with external data (a large input)."""
    from .model_io import EXTERNAL_THRESHOLD, _external_locations
    try:
        total = os.path.getsize(path)
        if total > EXTERNAL_THRESHOLD:
            return True
        import onnx
        m = onnx.load(path, load_external_data=False)
        folder = os.path.dirname(os.path.abspath(path))
        for loc in {loc for _, loc in _external_locations(m)}:
            p = os.path.join(folder, loc)
            total += os.path.getsize(p) if os.path.isfile(p) else 0
        return total > EXTERNAL_THRESHOLD
    except Exception:   # unreadable: the load reports it
        return False


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.list_passes:
        print(list_passes())
        return EXIT_OK
    if args.inspect:
        if not args.input:
            raise UsageError("--inspect needs a model path")
        from .inspection import inspect_model
        print(inspect_model(args.input, args.passes, parse_sets(args.set), args.calibration_data,
                            _image_options(args)))
        return EXIT_OK
    if not args.input or not args.output:
        raise UsageError("usage: onnxshrink IN OUT --passes a,b,... (see --help)")
    if not args.passes:
        raise UsageError("--passes is required (see --list-passes)")
    from .model_io import check_output_paths
    from .pipeline import shrink
    if not os.path.isfile(args.input) and os.path.exists(args.input):
        raise UsageError(f"input '{args.input}' is not a file")
    tol = tolerances(args)
    if args.gate == "metric" and (args.metric is None or args.max_drop is None):
        raise UsageError("--gate metric needs --metric and --max-drop (the metric is then the only judge)")
    check_output_paths(args.output, args.input, args.report, force=args.force,
                       external=os.path.isfile(args.input) and _may_be_external(args.input),
                       data_paths=(args.calibration_data, args.validation_data))
    data = Data(calibration=args.calibration_data, validation=args.validation_data,
                image_options=_image_options(args), random=args.random_calibration)
    targets = Targets(flops=args.target_flops, params=args.target_params, size=args.target_size,
                      metric=args.metric, max_drop=args.max_drop)
    run = Run(force=args.force, quiet=args.quiet, batch_size=args.batch_size, seed=args.seed,
              options=parse_sets(args.set), threads=args.threads, keep=args.keep)
    with warnings.catch_warnings():
        warnings.simplefilter("default")     # --quiet silences progress, never warnings
        warnings.showwarning = lambda m, *a, **k: print(f"onnxshrink: warning: {cli_message(str(m))}", file=sys.stderr)
        try:
            result = shrink(args.input, args.passes, data=data, targets=targets, checks=tol, run=run)
        except CheckFailed as e:
            partial = e.result
            if partial is not None:
                partial.close()   # its model is not needed: only the report is written
                if args.report:
                    _write_report(args.report, partial.report)
                if not args.quiet:
                    print(console_table(partial.report))
            raise
    with result:
        result.save(args.output, report_path=args.report)
    report = result.report
    if args.profile:
        print(profile_table(report))
    if not args.quiet:
        print(console_table(report))
    if report.get("unchanged"):
        print("onnxshrink: warning: nothing changed (" + "; ".join(report["nothing_changed"])
              + f"); wrote the input unchanged to {args.output}", file=sys.stderr)
    if report.get("check_failed"):
        print(f"onnxshrink: warning: {cli_message(report['check_failed'])}; written anyway because of --force",
              file=sys.stderr)
        return EXIT_FORCED
    if not args.quiet:
        print(f"wrote {args.output}")
    return EXIT_OK


def _write_report(path, report):
    from .model_io import atomic_write_text
    atomic_write_text(path, to_json(report))


if __name__ == "__main__":
    sys.exit(main())
