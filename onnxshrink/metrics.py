"""Task metrics: how a user judges a compressed model.

A metric is ``fn(outputs, feeds) -> float``, higher is better: ``outputs`` is a list with one dict
(output name -> array) per feed, ``feeds`` the list of feed dicts they came from. It is evaluated on
the original's and on the candidate's outputs for the same feeds; the *drop* is
``m(original) - m(candidate)``.

Built-in metrics, selected by name, compare the candidate with the original and so score the
original as perfect:

- ``top1``: agreement of the argmax over the last axis, per sample, for every output whose last
  axis is longer than one (score-like outputs); the mean over samples, the minimum over outputs.
- ``cosine``: cosine similarity per sample (flattened), the worst sample of the worst output.
- ``rel_l2``: minus the relative L2 error ‖a − b‖/‖a‖ per output (0 for the original).
- ``mse``: minus the mean squared error per output, the worst output (0 for the original).

A user metric is given as ``path/to/file.py:function`` or ``module:function`` (CLI ``--metric``),
or as a callable (API ``metric=``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import UsageError, first_line, number


@dataclass
class Metric:
    name: str
    fn: Callable                 # user: fn(outputs, feeds); built-in: fn(reference, outputs)
    relative: bool = False       # True: compares with the original's outputs

    def values(self, reference: list, outputs: list, feeds: list) -> tuple[float, float]:
        """(metric of the original, metric of the candidate) on the same feeds."""
        if self.relative:
            orig, cand = self.fn(reference, reference), self.fn(reference, outputs)
        else:
            orig, cand = _call(self, reference, feeds), _call(self, outputs, feeds)
        return orig, cand


def _call(metric: Metric, outputs, feeds) -> float:
    try:
        value = metric.fn(outputs, feeds)
    except Exception as e:
        raise UsageError(f"metric '{metric.name}' raised {type(e).__name__}: {first_line(e)}") from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"metric '{metric.name}' must return a number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise UsageError(f"metric '{metric.name}' returned {value}; it must be a finite number")
    return value


def _pairs(reference, outputs):
    """(name, original array, candidate array) per feed and output."""
    if len(reference) != len(outputs):
        raise ValueError("reference and outputs hold different numbers of feeds")
    for ref, new in zip(reference, outputs):
        for name, a in ref.items():
            yield name, np.asarray(a, np.float64), np.asarray(new[name], np.float64)


def _per_output(reference, outputs, score):
    """{output name: [per-feed score arrays]} for a per-sample score function."""
    per = {}
    for name, a, b in _pairs(reference, outputs):
        s = score(a, b)
        if s is not None:
            per.setdefault(name, []).append(np.atleast_1d(s))
    return {k: np.concatenate(v) for k, v in per.items()}


def _batched(a):
    """Rows: one per sample (axis 0) when the array has a batch axis, else one row."""
    return a.reshape(len(a), -1) if a.ndim >= 2 else a.reshape(1, -1)


def top1(reference, outputs) -> float:
    def agree(a, b):
        if a.ndim == 0 or a.shape[-1] < 2 or a.shape != b.shape:
            return None if a.shape == b.shape else np.zeros(1)
        return (a.argmax(-1) == b.argmax(-1)).reshape(-1).astype(np.float64)
    per = _per_output(reference, outputs, agree)
    if not per:
        raise UsageError("metric 'top1' needs an output whose last axis holds scores (length > 1); "
                         "the model has none: use cosine, rel_l2, mse or a metric of your own")
    return float(min(v.mean() for v in per.values()))


def cosine(reference, outputs) -> float:
    def cos(a, b):
        if a.shape != b.shape:
            return np.full(1, -1.0)
        x, y = _batched(a), _batched(b)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        dot = (x * y).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = dot / (nx * ny)
        both_zero = (nx == 0) & (ny == 0)
        c = np.where(both_zero, 1.0, np.where((nx == 0) | (ny == 0), 0.0, c))
        return np.where(np.isfinite(c), c, -1.0)
    per = _per_output(reference, outputs, cos)
    return float(min(v.min() for v in per.values()))


def _sums(reference, outputs, weight):
    """({output: Σ (a − b)²}, {output: Σ weight(a)}) over the feeds; None when a shape differs."""
    err, base = {}, {}
    for name, a, b in _pairs(reference, outputs):
        if a.shape != b.shape:
            return None
        err[name] = err.get(name, 0.0) + float(((a - b) ** 2).sum())
        base[name] = base.get(name, 0.0) + weight(a)
    return err, base


def rel_l2(reference, outputs) -> float:
    sums = _sums(reference, outputs, lambda a: float((a ** 2).sum()))
    if sums is None:
        return -math.inf
    num, den = sums
    errs = [math.sqrt(num[k] / den[k]) if den[k] > 0 else math.sqrt(num[k]) for k in num]
    worst = max(errs)
    return -worst if math.isfinite(worst) else -math.inf


def mse(reference, outputs) -> float:
    sums = _sums(reference, outputs, lambda a: a.size)
    if sums is None:
        return -math.inf
    sq, n = sums
    worst = max(sq[k] / max(n[k], 1) for k in sq)
    return -worst if math.isfinite(worst) else -math.inf


BUILTIN = {"top1": top1, "cosine": cosine, "rel_l2": rel_l2, "mse": mse}


def resolve(spec) -> Metric | None:
    """A Metric from a built-in name, ``file.py:function``, ``module:function`` or a callable."""
    if spec is None:
        return None
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        return Metric(getattr(spec, "__name__", "metric"), spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"metric must be a name ({', '.join(BUILTIN)}), 'file.py:function', "
                         f"'module:function' or a callable; got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN:
        return Metric(spec, BUILTIN[spec], relative=True)
    where, sep, func = spec.rpartition(":")
    if not sep or not where or not func:
        raise UsageError(f"unknown metric '{spec}': built-in metrics are {', '.join(BUILTIN)}; a metric of "
                         "your own is 'path/to/file.py:function' or 'module:function'")
    module = _load_module(where, spec)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"metric '{spec}': '{where}' has no function '{func}'")
    return Metric(spec, fn)


def _load_module(where: str, spec: str):
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not os.path.isfile(where):
            raise UsageError(f"metric '{spec}': file '{where}' does not exist")
        name = "onnxshrink_user_metric_" + os.path.splitext(os.path.basename(where))[0]
        mod_spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"metric '{spec}': loading '{where}' raised {type(e).__name__}: {first_line(e)}") from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as e:
        raise UsageError(f"metric '{spec}': cannot import module '{where}' ({type(e).__name__}: {first_line(e)})") from None


def check_max_drop(value) -> float | None:
    if value is None:
        return None
    value = number(value, "max-drop")
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"max-drop must be a finite number >= 0 (an absolute drop of the metric), got {value}")
    return value


def constant_outputs(reference: list) -> list:
    """The outputs of a model that ignores its input: every output, per feed, the mean of the
    original's samples (axis 0) over all the feeds whose output has that sample shape."""
    sums: dict = {}
    for ref in reference:
        for name, a in ref.items():
            a = np.asarray(a)
            if a.ndim == 0 or not np.issubdtype(a.dtype, np.number):
                continue
            key = (name, a.shape[1:])
            s, n = sums.get(key, (0.0, 0))
            sums[key] = (s + a.astype(np.float64).sum(0), n + len(a))
    out = []
    for ref in reference:
        new = {}
        for name, a in ref.items():
            a = np.asarray(a)
            if a.ndim == 0 or not np.issubdtype(a.dtype, np.number):
                new[name] = a
                continue
            s, n = sums[(name, a.shape[1:])]
            mean = s / n
            if np.issubdtype(a.dtype, np.integer):
                mean = np.rint(mean)
            new[name] = np.broadcast_to(mean.astype(a.dtype), a.shape).copy()
        out.append(new)
    return out


def blind_spot(metric: Metric, reference: list, feeds: list, max_drop: float, where: str) -> str | None:
    """Why ``metric`` cannot judge a model on these feeds, or None: when a model whose outputs are
    constant (``constant_outputs``: the original's mean output, whatever the input) keeps the
    metric within ``max_drop`` of the original's, a search or a gate on it would accept a model
    that has lost its task (a classifier's feeds that all hold one label, a detector's with no
    object)."""
    orig, const = metric.values(reference, constant_outputs(reference), feeds)
    if orig - const > max_drop:
        return None
    return (f"metric '{metric.name}' cannot judge on the {where}: a model whose outputs are constant (the "
            f"original's mean output for every input) scores {const:.4g} against the original's {orig:.4g}, "
            f"within max_drop {max_drop}; give feeds whose outcomes differ (more than one label), or another metric")
