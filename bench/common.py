"""Shared benchmark machinery: run onnxshrink on a reference model and measure, in one process,
params/FLOPs/bytes ratios, ONNX Runtime latency ratio (interleaved, median, 1 thread), accuracy
before/after on the digits test split, and the tool's wall time, the part spent in calibration
inference (and runs over the data), their ratio, and the fitting + search seconds.

Calibration is the 512 first training images (models/<name>_calib.npz); validation uses the
next 256 training images, so no test image is ever seen by the tool.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models import digits  # noqa: E402
from onnxshrink import shrink  # noqa: E402
from onnxshrink.cost import model_cost  # noqa: E402


@dataclass
class Case:
    model: str                  # reference model name (models/<model>.onnx)
    passes: list
    label: str = ""
    options: dict = field(default_factory=dict)
    target_flops: float | None = None
    target_params: float | None = None
    target_bytes: float | None = None
    batch: int = 256            # latency batch size


def load(name):
    return onnx.load(digits.model_path(name))


def data(name):
    kind = digits.MODELS[name]
    split = digits.load_split()
    calib = digits.to_model_input(split["x_train"][:512], kind)
    val = digits.to_model_input(split["x_train"][512:768], kind)
    return kind, calib, val


def session(model, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def latency_ratio(model_a, model_b, feed_a, feed_b=None, runs=25, threads=1):
    """Median latency of b / median latency of a, measured interleaved in one process."""
    feed_b = feed_a if feed_b is None else feed_b
    sa, sb = session(model_a, threads), session(model_b, threads)
    for _ in range(3):
        sa.run(None, feed_a)
        sb.run(None, feed_b)
    ta, tb = [], []
    for _ in range(runs):
        t = time.perf_counter()
        sa.run(None, feed_a)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        sb.run(None, feed_b)
        tb.append(time.perf_counter() - t)
    return float(np.median(tb) / np.median(ta)), float(np.median(ta)), float(np.median(tb))


def batch_feed(model, kind, batch):
    x, _ = digits.test_set(kind)
    reps = int(np.ceil(batch / len(x)))
    xb = np.concatenate([x] * reps)[:batch]
    return {model.graph.input[0].name: xb}


def measure(original, rewritten, kind, batch=256, runs=25):
    """Ratios, latency and accuracy of a rewritten model against the original."""
    calib_shape = {original.graph.input[0].name: digits.to_model_input(digits.load_split()["x_train"][:1], kind).shape[1:]}
    cb, ca = model_cost(original, calib_shape), model_cost(rewritten, calib_shape)
    lat, _, _ = latency_ratio(original, rewritten, batch_feed(original, kind, batch), runs=runs)
    return {
        "params": ca["params"] / cb["params"], "flops": ca["flops"] / cb["flops"],
        "bytes": ca["bytes"] / cb["bytes"], "latency": lat,
        "acc_before": digits.accuracy(original, kind), "acc_after": digits.accuracy(rewritten, kind),
    }


def run_case(case: Case, runs=25):
    original = load(case.model)
    kind, calib, val = data(case.model)
    t = time.perf_counter()
    res = shrink(original, case.passes, calibration=calib, validation=val, options=case.options,
                 target_flops=case.target_flops, target_params=case.target_params,
                 target_bytes=case.target_bytes, force=True)   # the default gate; its verdict is in the row
    wall = time.perf_counter() - t
    row = measure(original, res.model, kind, case.batch, runs)
    row.update({"model": case.model, "label": case.label or ",".join(case.passes), "wall_s": wall,
                "report": res.report, "result_model": res.model, "gate": res.report["validation"]["passed"]})
    row.update(report_times(res.report))
    return row


def report_times(report):
    """From a report's per-pass timing: calibration inference seconds (``calib_s``), runs over the
    data (``calib_runs``) and fitting + search seconds (``fit_s``), summed over the passes."""
    passes = report.get("passes") or []
    t = lambda p, k: (p.get("timing") or {}).get(k, 0.0)  # noqa: E731
    return {"calib_s": sum(t(p, "calibration") for p in passes),
            "calib_runs": int(sum(t(p, "calibration_runs") for p in passes)),
            "fit_s": sum(t(p, "fit") + t(p, "search") for p in passes)}


HEADER = (f"{'model':13} {'config':34} {'params':>7} {'flops':>7} {'bytes':>7} {'latency':>8} "
          f"{'acc':>7} {'acc new':>7} {'Δpp':>6} {'tool s':>7} {'calib s':>7} {'tool/cal':>8} {'runs':>4} "
          f"{'fit s':>7}")


def tool_over_calibration(tool_s, calib_s):
    """The tool's time over its calibration inference time (the physical floor of a post-training
    compressor): None when either is unknown or no inference ran."""
    if tool_s is None or not calib_s:
        return None
    return tool_s / calib_s


def format_row(r):
    d = 100 * (r["acc_after"] - r["acc_before"])
    wall = f"{r['wall_s']:7.1f}" if r.get("wall_s") is not None else f"{'-':>7}"
    calib = f"{r['calib_s']:7.1f}" if r.get("calib_s") is not None else f"{'-':>7}"
    ratio = tool_over_calibration(r.get("wall_s"), r.get("calib_s"))
    ratio = f"{ratio:8.1f}" if ratio is not None else f"{'-':>8}"
    return (f"{r['model']:13} {r['label'][:34]:34} {r['params']:7.3f} {r['flops']:7.3f} {r['bytes']:7.3f} "
            f"{r['latency']:8.3f} {100 * r['acc_before']:7.2f} {100 * r['acc_after']:7.2f} {d:6.2f} {wall} {calib}"
            f" {ratio} {r.get('calib_runs', 0):4d} {r.get('fit_s', 0.0):7.1f}"
            + ("" if r.get("gate", True) else "  default gate fails: " + "; ".join(r["report"]["validation"]["problems"])))
