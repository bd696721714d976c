"""Validation of a rewritten model against the original.

Structural: ``onnx.checker.check_model(full_check=True)``, ONNX Runtime creates a session, only
standard ONNX ops (domain "" / "ai.onnx"), graph inputs and outputs keep their names and dtypes;
the ops a rewrite introduces are listed, with those TensorRT's ONNX parser would refuse.
Numeric, on held-out inputs, per output: max abs error, relative L2 error ‖a − b‖/‖a‖, cosine
similarity of the flattened outputs, the max abs error relative to the output's scale (the range
of the original's values, or 1 for probabilities), the worst sample (lowest cosine, largest
relative L2), for outputs whose last axis is > 1 top-1 agreement along it, and for score outputs
(a Sigmoid gives them) the decision IoU: of the values above 0.5 in either model, the share
above it in both.

The default gate (``Tolerances()``, the same as ``ZOO_GATE``), chosen on the real-model zoo
(README, "What the default validation checks"; ``Tolerances.cosine_only()`` is the former,
lenient default): per output, max abs error ≤ 0.35 of the output's scale (for a score map, a
score output of at least 1024 values a sample, its 99th percentile: where a region's edge moves
by a pixel, the pixels on the edge swing through the threshold: thin regions such as text lines
have about one pixel in a hundred on an edge); relative L2 ≤ 0.2
and cosine ≥ 0.9 overall; worst-sample cosine ≥ 0.98 for outputs of at least 32 values a sample;
top-1 agreement ≥ 0.9 for probability distributions over the last axis; decision IoU ≥ 0.8 for
score outputs with at least 10 values above 0.5. Probability outputs (every value of the original
in [0, 1]) are judged on their own absolute scale only: relative measures of scores that all sit
near 0 measure noise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import DataSource, _batches, fixed_batch, session
from .cost import model_bytes
from .errors import CalibrationError, UsageError, first_line
from .metrics import blind_spot
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


WORST_SAMPLE_MIN_VALUES = 32   # worst-sample cosine is judged on outputs of at least this many values a sample
DECISION_THRESHOLD = 0.5      # a score output's decisions: its values above this
DECISION_MIN_POSITIVES = 10    # the decision IoU is judged when at least this many values are above it (either model)
PROBABILITY_SLACK = 1e-6      # a probability output's values may pass 0 or 1 by float rounding (ONNX Runtime's
                              # vectorised Sigmoid gives 1.0000001 on some runs: the PP-OCRv4 detector's map)
MAP_MIN_VALUES = 1024          # a score output of at least this many values a sample is a map (a text or saliency map)
MAP_QUANTILE = 0.99            # a map's range check reads this quantile of its abs errors, not the max
ERROR_BINS = 2000              # histogram of a score output's abs errors over [0, 1]
SCORE_OPS = ("Sigmoid", "HardSigmoid")          # an output one of these gives (through SHAPE_OPS) is a score output
SHAPE_OPS = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


@dataclass
class Tolerances:
    max_error: float | None = None    # max abs error per output
    min_cosine: float | None = 0.9    # cosine similarity per output (not for probability outputs)
    min_top1: float | None = 0.9      # top-1 agreement of probability distributions over the last axis
    max_rel_l2: float | None = 0.2    # relative L2 error per output (not for probability outputs)
    max_range_error: float | None = 0.35   # max abs error / the output's scale (range, or 1 for probabilities)
    min_worst_cosine: float | None = 0.98  # the worst sample's cosine, outputs of ≥ 32 values a sample
    min_decision_iou: float | None = 0.8   # score outputs (a Sigmoid gives them): IoU of the values above 0.5

    def __post_init__(self):
        for name in (f.name for f in dataclasses.fields(self)):
            v = getattr(self, name)
            if v is None:
                continue
            try:
                ok = not isinstance(v, bool) and math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UsageError(f"{name} must be a finite number (or None to skip the check), got {v!r}")

    @classmethod
    def cosine_only(cls, min_cosine: float = 0.9) -> "Tolerances":
        """The former default: cosine ≥ ``min_cosine`` on every output that is not a probability,
        no other check (lenient: it passes task-broken models; README, "What the default
        validation checks")."""
        return dataclasses.replace(cls.metric_only(), min_cosine=min_cosine)

    @classmethod
    def metric_only(cls) -> "Tolerances":
        """No output-level threshold: the user's task metric with ``max_drop`` is the judge (the
        gate a run with ``metric=`` and ``max_drop=`` and no tolerances of its own gets). Shapes and
        NaN/Inf the original does not give still fail; every output measure is still reported."""
        return cls(**{f.name: None for f in dataclasses.fields(cls)})


# the gate chosen on the real-model zoo (README, "What the default validation checks")
ZOO_GATE = {k: v for k, v in dataclasses.asdict(Tolerances()).items() if v is not None}   # the defaults


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


class OutputStats:
    """One output's comparison, accumulated feed by feed: max abs error, relative L2 error
    ‖a − b‖/‖a‖ and cosine over every element both models give finite, the original's range
    (and whether its values are probabilities: all in [0, 1]; a distribution when they also sum
    to 1 over the last axis), top-1 agreement along the last axis when it is > 1, the count of
    NaN/Inf values the rewritten model gives where the original does not (a failure) and of those
    both give (reported), and the worst sample (lowest cosine; its relative L2, and the largest
    relative L2 of any sample)."""

    def __init__(self, score: bool = False):
        self.score = score
        self.max_abs, self.d2, self.a2, self.b2, self.ab = 0.0, 0.0, 0.0, 0.0, 0.0
        self.agree = self.rows = self.compared = self.mismatch = self.both = self.total = 0
        self.shape_mismatch = None
        self.worst = None
        self.worst_rel_l2 = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.distribution = True
        self.values_per_sample = None
        self.above_both = self.above_either = 0   # values above DECISION_THRESHOLD in both models, in either
        self.error_hist = np.zeros(ERROR_BINS, np.int64) if score else None

    def add(self, x, y, feed=None, first_sample=0, samples=None):
        if x.shape != y.shape:
            self.shape_mismatch = self.shape_mismatch or [list(x.shape), list(y.shape)]
            return
        xf = x.astype(np.float64).ravel()
        yf = y.astype(np.float64).ravel()
        fx, fy = np.isfinite(xf), np.isfinite(yf)
        finite = fx & fy
        self.total += xf.size
        # NaN/inf where the original has a finite value or another non-finite one
        self.mismatch += int((~finite & (xf != yf) & ~(np.isnan(xf) & np.isnan(yf))).sum())
        self.both += int((~fx & ~fy & ((xf == yf) | (np.isnan(xf) & np.isnan(yf)))).sum())
        xc, yc = xf[finite], yf[finite]
        self.compared += xc.size
        if xc.size:
            d = xc - yc
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))
            self.d2 += float(d @ d)
            self.a2 += float(xc @ xc)
            self.b2 += float(yc @ yc)
            self.ab += float(xc @ yc)
            self.lo, self.hi = min(self.lo, float(xc.min())), max(self.hi, float(xc.max()))
            if self.score:
                px, py = xc > DECISION_THRESHOLD, yc > DECISION_THRESHOLD
                self.above_both += int(np.count_nonzero(px & py))
                self.above_either += int(np.count_nonzero(px | py))
                bins = np.minimum((np.abs(d) * ERROR_BINS).astype(np.int64), ERROR_BINS - 1)
                self.error_hist += np.bincount(bins, minlength=ERROR_BINS)
        floating = np.issubdtype(x.dtype, np.floating)
        if x.ndim >= 1 and x.shape[-1] > 1 and floating and x.size:
            ok = np.isfinite(x).all(-1) & np.isfinite(y).all(-1)
            self.agree += int(((x.argmax(-1) == y.argmax(-1)) & ok).sum())
            self.rows += int(ok.sum())
            if self.distribution:
                sums = np.where(np.isfinite(x), x, 0).astype(np.float64).sum(-1)
                self.distribution = bool(np.all(np.abs(sums - 1.0) <= 1e-3))
        else:
            self.distribution = False
        self._worst(x, y, feed, first_sample, samples)

    def _worst(self, x, y, feed, first_sample, samples):
        """The sample (or, for outputs not sample-major, the feed) with the lowest cosine."""
        per_sample = x.ndim >= 1 and samples is not None and x.shape[0] == samples and samples > 1
        rows = x.reshape(x.shape[0], -1) if per_sample else x.reshape(1, -1)
        rows_y = y.reshape(rows.shape)
        width = rows.shape[1]
        self.values_per_sample = width if self.values_per_sample is None else min(self.values_per_sample, width)
        for i, (a, b) in enumerate(zip(rows.astype(np.float64), rows_y.astype(np.float64))):
            ok = np.isfinite(a) & np.isfinite(b)
            a, b = a[ok], b[ok]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(np.allclose(a, b)) if a.size else float("nan")
            rel = float(np.linalg.norm(a - b) / na) if na > 0 else float(np.linalg.norm(a - b))
            self.worst_rel_l2 = max(self.worst_rel_l2, rel) if rel == rel else self.worst_rel_l2
            if self.worst is None or not cos >= self.worst["cosine"]:
                self.worst = {"cosine": cos, "rel_l2": rel, "feed": feed,
                              "sample": (int(first_sample[i]) if isinstance(first_sample, np.ndarray)
                                         else first_sample + i) if per_sample or samples == 1 else None}

    def result(self) -> dict:
        if self.shape_mismatch is not None:
            return {"max_abs": float("inf"), "rel_l2": float("inf"), "cosine": -1.0, "top1_agreement": None,
                    "shape_mismatch": self.shape_mismatch}
        nx, ny = np.sqrt(self.a2), np.sqrt(self.b2)
        if not self.compared:    # nothing finite to compare: never a perfect score
            cos = rel = float("nan")
        else:
            cos = float(self.ab / (nx * ny)) if nx > 0 and ny > 0 else float(self.max_abs == 0.0)
            rel = float(np.sqrt(self.d2) / nx) if nx > 0 else float(np.sqrt(self.d2))
        probability = bool(self.compared) and self.lo >= -PROBABILITY_SLACK and self.hi <= 1.0 + PROBABILITY_SLACK
        scale = 1.0 if probability else (self.hi - self.lo if self.compared else 0.0)
        if not scale > 0:
            scale = max(abs(self.lo), abs(self.hi)) if self.compared else 0.0
        range_error = self.max_abs / scale if scale > 0 else (0.0 if self.max_abs == 0 else float("inf"))
        entry = {"max_abs": self.max_abs, "rel_l2": rel, "cosine": cos,
                 "top1_agreement": self.agree / self.rows if self.rows else None,
                 "range_error": range_error, "scale": scale, "probability": probability,
                 "distribution": bool(probability and self.rows and self.distribution),
                 "worst_rel_l2": self.worst_rel_l2, "values_per_sample": self.values_per_sample}
        if self.score:
            entry["score"] = True
            entry["above_threshold"] = self.above_either
            if self.above_either >= DECISION_MIN_POSITIVES:
                entry["decision_iou"] = self.above_both / self.above_either
            if probability and (self.values_per_sample or 0) >= MAP_MIN_VALUES and self.error_hist.sum():
                # a map: where a region's edge moves by a pixel, the pixels on it swing through the
                # threshold; the range check reads the MAP_QUANTILE of the errors (the bin's upper edge)
                cum = np.cumsum(self.error_hist) / self.error_hist.sum()
                q = (int(np.searchsorted(cum, MAP_QUANTILE)) + 1) / ERROR_BINS
                entry["map_abs_quantile"] = min(q, self.max_abs)
        if self.mismatch:
            entry["nonfinite_mismatch"] = self.mismatch
        if self.both:
            entry["nonfinite_both"] = self.both
        if not self.compared:
            entry["compared"] = 0
        if self.worst is not None:
            entry["worst"] = self.worst
        return entry


def score_outputs(model: onnx.ModelProto) -> set:
    """Names of the graph outputs that are scores: a Sigmoid (``SCORE_OPS``) gives them, directly
    or through ops that only move values (``SHAPE_OPS``). Their values above 0.5 are decisions (a
    detection kept, a pixel in a mask)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = set()
    for o in model.graph.output:
        t, hops = o.name, 0
        while t in producer and producer[t].op_type in SHAPE_OPS and producer[t].input and hops < 64:
            t, hops = producer[t].input[0], hops + 1
        if t in producer and producer[t].op_type in SCORE_OPS:
            out.add(o.name)
    return out


def compare_outputs(a: dict, b: dict) -> dict:
    """{output: metrics} of one pair of output dicts (see ``OutputStats``)."""
    result = {}
    for name, x in a.items():
        st = OutputStats()
        st.add(x, b[name])
        entry = st.result()
        entry.pop("worst", None)
        result[name] = entry
    return result


def _units(model, data):
    fixed = fixed_batch(model)
    if fixed is not None:   # a fixed-batch model runs whole batches only
        return ((f, None, i * fixed) for i, f in enumerate(_batches(data, fixed, model)[0]))
    return data.validation_batches(256)


def compare_models(original, model, data: DataSource, problems: list, keep: dict | None = None):
    """Run both models feed by feed and compare per feed; returns ({output: metrics aggregated
    over the feeds}, samples, feeds). The original runs first and its session is gone before
    the rewritten model's is made (one session at a time, for large models); that one session
    also serves the load check (a failure is added to ``problems``). With ``keep`` (a dict), the
    per-feed outputs of both models and the feeds are kept in it ("reference", "outputs",
    "feeds"), for a task metric."""
    sess = session(original)
    names = [o.name for o in sess.get_outputs()]
    ref = [(sess.run(names, feed), index, first, data.batch_count(feed)) for feed, index, first in _units(original, data)]
    del sess
    if not ref:
        raise CalibrationError(f"{data.origin}: {data.n} sample(s), fewer than the model's fixed batch "
                               f"of {fixed_batch(original)}")
    try:
        sess = session(model)
    except Exception as e:
        problems.append(f"ONNX Runtime cannot load the model: {first_line(e)}")
        return {}, 0, 0
    scores = score_outputs(original)
    stats = {n: OutputStats(score=n in scores) for n in names}
    samples = 0
    try:
        for (outs, index, first, n), (feed, _, _) in zip(ref, _units(original, data)):
            new = sess.run(names, feed)
            for name, x, y in zip(names, outs, new):
                stats[name].add(np.asarray(x), np.asarray(y), index, first, n)
            samples += n
            if keep is not None:
                keep.setdefault("reference", []).append(dict(zip(names, outs)))
                keep.setdefault("outputs", []).append(dict(zip(names, new)))
                keep.setdefault("feeds", []).append(feed)
    except Exception as e:
        problems.append(f"ONNX Runtime fails to run the model: {first_line(e)}")
        return {}, 0, 0
    return {n: st.result() for n, st in stats.items()}, samples, len(ref)


def validate(original: onnx.ModelProto, model: onnx.ModelProto, data: DataSource | None,
             tol: Tolerances, metric=None, max_drop: float | None = None) -> dict:
    """Structural checks, and on ``data`` the per-output comparison against the tolerances; with a
    task ``metric`` (``metrics.Metric``) also its value for the original and the rewritten model
    on the same feeds, failing when the drop exceeds ``max_drop``."""
    problems = structural_problems(original, model)
    outputs, samples, feeds = {}, 0, 0
    keep = {} if metric is not None else None
    task, notes_first = None, []
    if data is None:
        try:
            session(model)
        except Exception as e:
            problems.append(f"ONNX Runtime cannot load the model: {first_line(e)}")
    else:
        outputs, samples, feeds = compare_models(original, model, data, problems, keep)
        problems += _tolerance_failures(outputs, tol)
        if keep:
            task = task_metric(metric, keep["reference"], keep["outputs"], keep["feeds"], max_drop)
            if task["within"] is False:
                problems.append(f"metric '{task['name']}' dropped by {task['drop']:.4g} "
                                f"({task['original']:.4g} -> {task['candidate']:.4g}), more than max_drop {max_drop}")
            if max_drop is not None:
                blind = blind_spot(metric, keep["reference"], keep["feeds"], max_drop, "validation feeds")
                if blind:   # the metric's verdict says nothing here: a failure where it is the only judge
                    task["blind"] = blind
                    (problems if tol == Tolerances.metric_only() else notes_first).append(blind)
    notes = notes_first + [f"output '{k}': {m['nonfinite_both']} value(s) are NaN/Inf in both the original and the rewritten "
             "model (left out of the metrics)" for k, m in outputs.items() if m.get("nonfinite_both")]
    result = {"outputs": outputs, "samples": samples, "feeds": feeds,
              "problems": problems, "notes": notes, "passed": not problems, **introduced_ops(original, model)}
    if task is not None:
        result["metric"] = task
    return result


def task_metric(metric, reference: list, outputs: list, feeds: list, max_drop: float | None = None) -> dict:
    """{name, original, candidate, drop, max_drop, within} of a task metric on the same feeds."""
    orig, cand = metric.values(reference, outputs, feeds)
    drop = orig - cand
    return {"name": metric.name, "original": orig, "candidate": cand, "drop": drop, "max_drop": max_drop,
            "within": None if max_drop is None else bool(drop <= max_drop)}


def model_outputs(model: onnx.ModelProto, data: DataSource, like: onnx.ModelProto | None = None):
    """(per-feed outputs, feeds) of one model over ``data``, split as validation splits it (``like``:
    the model whose batch rules decide the split, default ``model``)."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    outs, feeds = [], []
    for feed, _, _ in _units(like if like is not None else model, data):
        outs.append(dict(zip(names, sess.run(names, feed))))
        feeds.append(feed)
    return outs, feeds


# ----------------------------------------------------------------------------- output effect of a change
GAIN_SAMPLES = 64       # a change's output effect is measured on at most this many calibration samples (units)


class OutputProbe:
    """A model's outputs on (up to ``GAIN_SAMPLES`` units of) a pass's calibration data, and the
    ``output_error`` of a changed model against them: the measured effect a budget allocation
    weighs a layer's or a group's change by (pfa, basisconv, pq)."""

    def __init__(self, ctx, model: onnx.ModelProto):
        data = ctx.require_data()
        self.data = data.subset(0, GAIN_SAMPLES) if data.units() > GAIN_SAMPLES else data
        self.like = ctx.reference   # the model whose batch rules split the data
        self.ref, self.feeds = model_outputs(model, self.data, like=self.like)

    def outputs(self, model: onnx.ModelProto) -> list:
        """``model``'s per-feed outputs on the probe's data."""
        return model_outputs(model, self.data, like=self.like)[0]

    def error(self, model: onnx.ModelProto) -> float:
        """``output_error`` of ``model``'s outputs against the probed model's."""
        return output_error(self.ref, self.outputs(model))


def output_error(ref: list, outs: list) -> float:
    """The model's output error of ``outs`` against ``ref`` (per-feed output dicts): over the
    float outputs, the largest of the mean per-sample relative squared error, a quarter of the
    worst sample's (a sample: axis 0 of an output of rank ≥ 2, else the feed), and a quarter of
    the squared largest absolute error over the output's range (the validation's range error: a
    few values far off, such as the quiet bins of a log spectrum, count)."""
    worst = 0.0
    for name in ref[0]:
        per, big, lo, hi = [], 0.0, np.inf, -np.inf
        for r, o in zip(ref, outs):
            a, b = np.asarray(r[name]), np.asarray(o[name])
            if not np.issubdtype(a.dtype, np.floating) or a.shape != b.shape or a.size == 0:
                continue
            a = a.astype(np.float64).reshape(len(a) if a.ndim >= 2 else 1, -1)
            b = b.astype(np.float64).reshape(a.shape)
            ok = np.isfinite(a) & np.isfinite(b)
            a, b = np.where(ok, a, 0.0), np.where(ok, b, 0.0)
            num, den = ((a - b) ** 2).sum(1), (a ** 2).sum(1)
            per.append(num / np.maximum(den, 1e-30))
            if ok.any():
                big = max(big, float(np.abs(a - b)[ok].max()))
                lo, hi = min(lo, float(a[ok].min())), max(hi, float(a[ok].max()))
        if not per:
            continue
        e = np.concatenate(per)
        worst = max(worst, float(e.mean()), float(e.max()) / 4)
        if hi > lo:
            worst = max(worst, (big / (hi - lo)) ** 2 / 4)
    return worst


def decision_flips(ref: list, outs: list) -> int:
    """The decisions ``outs`` change against ``ref`` (per-feed output dicts): over the float
    outputs whose last axis is longer than 1, the positions whose argmax along it differs (a
    label, a tag of a sequence a decoder reads, a class of a pixel)."""
    flips = 0
    for r, o in zip(ref, outs):
        for name, a in r.items():
            a, b = np.asarray(a), np.asarray(o[name])
            if np.issubdtype(a.dtype, np.floating) and a.ndim >= 1 and a.shape == b.shape and a.size \
                    and a.shape[-1] > 1:
                ok = np.isfinite(a).all(-1) & np.isfinite(b).all(-1)
                flips += int(((a.argmax(-1) != b.argmax(-1)) & ok).sum())
    return flips


def gate_failures(model: onnx.ModelProto, ref: list, outs: list, tol: Tolerances) -> list[str]:
    """The checks of ``tol`` that ``outs`` fail against ``ref`` (per-feed output dicts, ``ref``
    from ``model``, whose Sigmoid outputs are scores): the validation's gate on outputs a pass has
    already computed (its ``OutputProbe``); a sample is axis 0 of an output of rank >= 2."""
    scores, stats = score_outputs(model), {}
    for i, (r, o) in enumerate(zip(ref, outs)):
        for name, x in r.items():
            x, y = np.asarray(x), np.asarray(o[name])
            if np.issubdtype(x.dtype, np.floating):
                st = stats.setdefault(name, OutputStats(score=name in scores))
                st.add(x, y, i, 0, x.shape[0] if x.ndim >= 2 else 1)
    return _tolerance_failures({n: st.result() for n, st in stats.items()}, tol)


def _tolerance_failures(outputs, tol: Tolerances):
    fails = []
    for name, m in outputs.items():
        if "shape_mismatch" in m:
            fails.append(f"output '{name}' shape changed {m['shape_mismatch']}")
            continue
        if m.get("compared") == 0:
            fails.append(f"output '{name}' has no finite value to compare (the original gives NaN/Inf everywhere)")
            continue
        if m.get("nonfinite_mismatch"):
            fails.append(f"output '{name}' has {m['nonfinite_mismatch']} NaN/Inf value(s) the original does not")
        if tol.max_error is not None and m["max_abs"] > tol.max_error:
            fails.append(f"output '{name}' max abs error {m['max_abs']:.4g} > {tol.max_error}")
        prob = m.get("probability", False)   # relative measures of probabilities near 0 measure noise
        if tol.max_range_error is not None and m.get("map_abs_quantile") is not None:
            if not m["map_abs_quantile"] <= tol.max_range_error:
                fails.append(f"output '{name}' (a score map): the largest {1 - MAP_QUANTILE:.1%} of its abs errors "
                             f"reach {m['map_abs_quantile']:.4g} of probability scale 1 > {tol.max_range_error} "
                             f"(max {m['max_abs']:.4g})")
        elif tol.max_range_error is not None and m.get("range_error") is not None \
                and not m["range_error"] <= tol.max_range_error:
            scale = "probability scale 1" if prob else f"its range {m['scale']:.4g}"
            fails.append(f"output '{name}' max abs error {m['max_abs']:.4g} is {m['range_error']:.4g} of "
                         f"{scale} > {tol.max_range_error}")
        if tol.max_rel_l2 is not None and not prob and m["rel_l2"] > tol.max_rel_l2:
            fails.append(f"output '{name}' relative L2 error {m['rel_l2']:.4g} > {tol.max_rel_l2}")
        if tol.min_cosine is not None and not prob and m["cosine"] < tol.min_cosine:
            fails.append(f"output '{name}' cosine {m['cosine']:.4f} < {tol.min_cosine}")
        worst = m.get("worst")
        if tol.min_worst_cosine is not None and not prob and isinstance(worst, dict) \
                and (m.get("values_per_sample") or 0) >= WORST_SAMPLE_MIN_VALUES \
                and worst["cosine"] < tol.min_worst_cosine:
            where = f"feed {worst['feed']}" if worst.get("feed") is not None else f"sample {worst['sample']}"
            fails.append(f"output '{name}' worst-sample cosine {worst['cosine']:.4f} ({where}) < {tol.min_worst_cosine}")
        if tol.min_top1 is not None and m.get("distribution") and m["top1_agreement"] is not None \
                and m["top1_agreement"] < tol.min_top1:
            fails.append(f"output '{name}' top-1 agreement {m['top1_agreement']:.4f} < {tol.min_top1}")
        iou = m.get("decision_iou")
        if tol.min_decision_iou is not None and iou is not None and iou < tol.min_decision_iou:
            fails.append(f"output '{name}' decision IoU {iou:.4f} (its values above {DECISION_THRESHOLD} in the "
                         f"original and in the result) < {tol.min_decision_iou}")
    return fails
