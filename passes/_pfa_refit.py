"""pfa, refitting: the ridge toward the sliced weights, the held-out ridge choice, residual targets
and the statistics requests the sequential refit uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..stats import CrossMoments, LayerStats

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def ridge_toward(cm: CrossMoments, w0: np.ndarray, ridge: float):
    """W, b minimising ‖X W + b − Y‖² + α‖W − W0‖² (centered normal equations): the ridge pulls
    toward the layer's own (sliced) weights rather than toward zero, so a layer that lost few
    inputs stays close to what it was when the calibration data cannot pin every weight down."""
    n = max(cm.n, 1)
    mx, my = cm.x.mean, cm.mean_y
    cxx = cm.x.cov
    cxy = cm.xy / n - np.outer(mx, my)
    d = cxx.shape[0]
    alpha = ridge * max(np.trace(cxx) / max(d, 1), 1e-12)
    a = cxx + alpha * np.eye(d)
    rhs = cxy + alpha * w0
    try:
        w = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        w = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return w, my - mx @ w


@dataclass


class ResidualStats(LayerStats):
    """LayerStats whose target is what the layer must add to the pruned network's skip tensor to
    give the reference network's residual sum: y = R_ref[kept] − skip − shift. Fitting to it
    also corrects the error that earlier pruning left in the skip path."""

    skip: str = ""
    mask: np.ndarray | None = None
    shift: np.ndarray | None = None

    def tensors(self):
        return {"x": [self.x_tensor, self.skip], "y": [self.y_tensor]}

    def _features(self, x_arrays, y_arrays, rng):
        axis = 1 if self.kind == "conv" else -1
        y = y_arrays[self.y_tensor]
        if self.mask is not None and not self.mask.all():
            y = np.compress(self.mask, y, axis=axis)
        t = y - x_arrays[self.skip]
        if self.shift is not None:
            t = t - (self.shift.reshape((-1,) + (1,) * (t.ndim - 2)) if axis == 1 else self.shift)
        return super()._features(x_arrays, {self.y_tensor: t.astype(np.float32)}, rng)


def residual_target(node: gs.Node):
    """(sum tensor, skip tensor, bias constant) when the layer's output (through a MatMul's bias
    Add) goes only into an Add with another computed tensor, else None."""
    t, shift = node.outputs[0], None
    users = list(t.outputs)
    if node.op == "MatMul" and len(users) == 1 and users[0].op == "Add":
        c = [i for i in users[0].inputs if i is not t]
        if len(c) == 1 and isinstance(c[0], gs.Constant) and c[0].values.ndim >= 1:
            shift, t = c[0].values.reshape(-1).astype(np.float64), users[0].outputs[0]
            users = list(t.outputs)
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None
    other = [i for i in users[0].inputs if i is not t]
    if len(other) != 1 or isinstance(other[0], gs.Constant):
        return None
    return users[0].outputs[0].name, other[0].name, shift


class SplitStats:
    """A LayerStats request whose batches alternate between two accumulators (fit / held out)."""

    def __init__(self, inner):
        self.inner, self.key, self._calls = inner, inner.key, 0

    def tensors(self):
        return self.inner.tensors()

    def new(self, x_arrays, y_arrays):
        return [self.inner.new(x_arrays, y_arrays), self.inner.new(x_arrays, y_arrays)]

    def update(self, acc, x_arrays, y_arrays, rng):
        self.inner.update(acc[self._calls % 2], x_arrays, y_arrays, rng)
        self._calls += 1


def relative_error(cm: CrossMoments, w: np.ndarray, b: np.ndarray) -> float:
    """Relative squared error Σ‖xW + b − y‖² / Σ‖y − ȳ‖² from the moments (matrix products only)."""
    n = max(cm.n, 1)
    mx, my = cm.x.mean, cm.mean_y
    pred2 = np.sum(w * (cm.x.second @ w), axis=0) + 2 * b * (mx @ w) + b * b
    cross = np.sum(w * (cm.xy / n), axis=0) + b * my
    err = pred2 - 2 * cross + cm.yy / n
    var = cm.yy / n - my * my
    return float(max(err.sum(), 0.0) / max(var.sum(), 1e-12))


def choose_ridge(cm_a: CrossMoments, cm_b: CrossMoments, w0: np.ndarray | None, ridges=RIDGES,
                 columns: int = 64, seed: int = 0) -> float:
    """The ridge of ``ridges`` whose fit on ``cm_a`` (toward ``w0``, or zero) has the lowest error on
    the held-out ``cm_b``. One eigendecomposition Cov_a(x) = V diag(e) Vᵀ serves every α:
    W_α = V diag(1/(e + α)) Vᵀ (Cov_a(x, y) + α W0); the held-out error is measured on at most
    ``columns`` output columns (a random subset), which is enough to rank a scalar."""
    m = cm_a.sum_y.shape[0]
    sub = np.sort(np.random.default_rng(seed).choice(m, size=columns, replace=False)) if m > columns else np.arange(m)
    mask = np.zeros(m, dtype=bool)
    mask[sub] = True
    a, b = slice_outputs(cm_a, mask), slice_outputs(cm_b, mask)
    n = max(a.n, 1)
    mx, my = a.x.mean, a.mean_y
    cxx = a.x.cov
    cxy = a.xy / n - np.outer(mx, my)
    d = cxx.shape[0]
    scale = max(np.trace(cxx) / max(d, 1), 1e-12)
    try:
        e, v = np.linalg.eigh(cxx)
    except np.linalg.LinAlgError:
        return float(ridges[len(ridges) // 2])
    e = np.clip(e, 0.0, None)
    p = v.T @ cxy
    p0 = v.T @ w0[:, sub] if w0 is not None else np.zeros_like(p)
    held = []
    for r in ridges:
        alpha = r * scale
        w = v @ ((p + alpha * p0) / (e + alpha)[:, None])
        held.append(relative_error(b, w, my - mx @ w))
    return float(ridges[int(np.argmin(held))])


def merged(a: CrossMoments, b: CrossMoments) -> CrossMoments:
    out = CrossMoments(a.x.sum.shape[0], a.sum_y.shape[0])
    return out.merge(a).merge(b)


def slice_outputs(cm: CrossMoments, mask: np.ndarray) -> CrossMoments:
    out = CrossMoments(cm.x.sum.shape[0], int(mask.sum()))
    out.x = cm.x
    out.sum_y, out.xy, out.yy = cm.sum_y[mask], cm.xy[:, mask], cm.yy[mask]
    return out
