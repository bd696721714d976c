"""Validation of a rewritten model against the original.

Structural: ``onnx.checker.check_model(full_check=True)``, ONNX Runtime creates a session, only
standard ONNX ops (domain "" / "ai.onnx"), graph inputs and outputs keep their names and dtypes;
the ops a rewrite introduces are listed, with those TensorRT's ONNX parser would refuse.
Numeric, on held-out inputs: per output max abs error, relative L2 error ‖a − b‖/‖a‖, cosine
similarity of the flattened outputs, and for 2-D float outputs (classifier-like) top-1 agreement.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import DataSource, run_model, session
from .cost import model_bytes
from .errors import UsageError, first_line
from .model_io import has_lazy, lazy_tensors

STANDARD_DOMAINS = ("", "ai.onnx")

# Ops the TensorRT ONNX parser accepts (onnx-tensorrt's operator support matrix, TensorRT 8.4–10).
# Only ops a rewrite *introduces* are checked against it: the original's ops are the user's.
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GroupNormalization GRU HardSigmoid HardSwish Identity If InstanceNormalization IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean Min Mul Neg Not Or Pad PRelu Pow QuantizeLinear Range ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize Round Scan ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Unsqueeze Upsample Where Xor
""".split())


def introduced_ops(original: onnx.ModelProto, model: onnx.ModelProto) -> dict:
    """Op types the rewrite added, and those of them TensorRT's ONNX parser does not accept."""
    before = {n.op_type for n in original.graph.node}
    added = sorted({n.op_type for n in model.graph.node} - before)
    return {"introduced_ops": added, "tensorrt_unparseable": [op for op in added if op not in TENSORRT_OPS]}


@dataclass
class Tolerances:
    max_error: float | None = None    # max abs error per output
    min_cosine: float | None = 0.9    # cosine similarity per output
    min_top1: float | None = None     # top-1 agreement for 2-D outputs
    max_rel_l2: float | None = None

    def __post_init__(self):
        for name in ("max_error", "min_cosine", "min_top1", "max_rel_l2"):
            v = getattr(self, name)
            if v is None:
                continue
            try:
                ok = not isinstance(v, bool) and math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UsageError(f"{name} must be a finite number (or None to skip the check), got {v!r}")


def structural_problems(original: onnx.ModelProto, model: onnx.ModelProto) -> list[str]:
    problems = []
    try:
        if has_lazy(model):
            _check_lazy(model)
        elif model_bytes(model) < 2**31 - 1:  # ByteSize() itself fails over 2 GB
            onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        problems.append(f"onnx.checker: {first_line(e)}")
    def nonstandard(m):
        return {f"{n.domain}::{n.op_type}" for n in m.graph.node if n.domain not in STANDARD_DOMAINS}
    foreign = sorted(nonstandard(model) - nonstandard(original))  # the input's own are the user's
    if foreign:
        problems.append("non-standard ops introduced: " + ", ".join(foreign))

    def sig(m, which):
        init = {t.name for t in m.graph.initializer}
        return [(v.name, v.type.tensor_type.elem_type) for v in getattr(m.graph, which) if v.name not in init]
    for which in ("input", "output"):
        if sig(original, which) != sig(model, which):
            problems.append(f"graph {which}s changed: {sig(original, which)} -> {sig(model, which)}")
    return problems


def _check_lazy(model: onnx.ModelProto) -> None:
    """Full check of a large model whose weights stay in files: the graph is saved in a temporary
    folder beside sparse placeholders for its data files (the checker only looks at the graph,
    dims and types, and that each data file exists)."""
    with tempfile.TemporaryDirectory(prefix="onnxshrink-check-") as d:
        ends = {}
        for t in lazy_tensors(model):
            info = {e.key: e.value for e in t.external_data}
            ends[info["location"]] = max(ends.get(info["location"], 0), int(info["offset"]) + int(info["length"]))
        for loc, end in ends.items():
            with open(os.path.join(d, loc), "wb") as f:
                f.truncate(end)
        path = os.path.join(d, "model.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        onnx.checker.check_model(path, full_check=True)


def compare_outputs(a: dict, b: dict) -> dict:
    result = {}
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            result[name] = {"max_abs": float("inf"), "rel_l2": float("inf"), "cosine": -1.0,
                            "top1_agreement": None, "shape_mismatch": [list(x.shape), list(y.shape)]}
            continue
        xf = x.astype(np.float64).ravel()
        yf = y.astype(np.float64).ravel()
        finite = np.isfinite(xf) & np.isfinite(yf)
        # NaN/inf where the original has a finite value or another non-finite one
        nonfinite = int((~finite & (xf != yf) & ~(np.isnan(xf) & np.isnan(yf))).sum())
        xf, yf = xf[finite], yf[finite]  # the metrics are over the positions both have finite
        diff = xf - yf
        nx, ny = np.linalg.norm(xf), np.linalg.norm(yf)
        cos = float(xf @ yf / (nx * ny)) if nx > 0 and ny > 0 else float(np.allclose(xf, yf))
        entry = {
            "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
            "rel_l2": float(np.linalg.norm(diff) / nx) if nx > 0 else float(np.linalg.norm(diff)),
            "cosine": cos,
            "top1_agreement": None,
        }
        if nonfinite:
            entry["nonfinite_mismatch"] = nonfinite
        if x.ndim == 2 and x.shape[1] > 1 and np.issubdtype(x.dtype, np.floating):
            entry["top1_agreement"] = float((x.argmax(1) == y.argmax(1)).mean())
        result[name] = entry
    return result


def validate(original: onnx.ModelProto, model: onnx.ModelProto, data: DataSource | None,
             tol: Tolerances) -> dict:
    problems = structural_problems(original, model)
    outputs = {}
    # the original runs first and its session is gone before the rewritten model's is made:
    # one session at a time (large models), and that one serves both the load check and the run
    ref = run_model(original, data) if data is not None else None
    try:
        sess = session(model)
    except Exception as e:
        problems.append(f"ONNX Runtime cannot load the model: {first_line(e)}")
    else:
        if ref is not None:
            try:
                new = run_model(model, data, sess=sess)
            except Exception as e:
                problems.append(f"ONNX Runtime fails to run the model: {first_line(e)}")
            else:
                outputs = compare_outputs(ref, new)
                problems += _tolerance_failures(outputs, tol)
    return {"outputs": outputs, "samples": data.n if data is not None else 0,
            "problems": problems, "passed": not problems, **introduced_ops(original, model)}


def _tolerance_failures(outputs, tol: Tolerances):
    fails = []
    for name, m in outputs.items():
        if "shape_mismatch" in m:
            fails.append(f"output '{name}' shape changed {m['shape_mismatch']}")
            continue
        if m.get("nonfinite_mismatch"):
            fails.append(f"output '{name}' has {m['nonfinite_mismatch']} NaN/Inf value(s) the original does not")
        if tol.max_error is not None and m["max_abs"] > tol.max_error:
            fails.append(f"output '{name}' max abs error {m['max_abs']:.4g} > {tol.max_error}")
        if tol.max_rel_l2 is not None and m["rel_l2"] > tol.max_rel_l2:
            fails.append(f"output '{name}' relative L2 error {m['rel_l2']:.4g} > {tol.max_rel_l2}")
        if tol.min_cosine is not None and m["cosine"] < tol.min_cosine:
            fails.append(f"output '{name}' cosine {m['cosine']:.4f} < {tol.min_cosine}")
        if tol.min_top1 is not None and m["top1_agreement"] is not None and m["top1_agreement"] < tol.min_top1:
            fails.append(f"output '{name}' top-1 agreement {m['top1_agreement']:.4f} < {tol.min_top1}")
    return fails
