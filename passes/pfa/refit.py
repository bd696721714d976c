"""pfa, refitting: every weight layer that reads a pruned tensor is refit, level by level on the
pruned network's own inputs x̃, to the reference network's pre-activation y:

    W', b' = argmin ‖X̃ W' + b' − Y‖² + α‖W' − W0‖²

(toward the layer's sliced weights W0, or toward zero), α relative to the mean diagonal of Cov(x̃) and
chosen per layer on held-out calibration batches from one eigendecomposition of Cov(x̃). A layer whose
output goes only into a residual Add is fit to what it must add to the pruned skip tensor to give the
reference sum (``ResidualStats``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ...graph import export_model, import_graph
from ...reconstruct import layer_matrix, layer_stats_request, refit_order, ridge_solve
from ...stats import CrossMoments, LayerStats
from .edits import residual_target, write_layer

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


def sequential_refit(pruned, an, keep, consumers, cfg, ctx):
    """Refit ``consumers`` of the pruned channels level by level (``refit_order``): collect the level's
    statistics on the model as rewritten so far (x) and on the reference (y), solve, write, go on.
    Returns (model, {layer: relative error}, {layer: chosen ridge})."""
    levels = refit_order(import_graph(pruned), consumers)
    errors, ridges = {}, {}
    cur = pruned
    for lv, names in enumerate(levels):
        graph = import_graph(cur)
        nodes = {n.name: n for n in graph.nodes}
        reqs, residual = [], set()
        for n in names:
            node = nodes[n]
            req = layer_stats_request(node, n, node.inputs[0].name, node.outputs[0].name, positions=cfg.positions)
            res = residual_target(node) if cfg.residual_targets else None
            if res is not None:
                base = {f.name: getattr(req, f.name) for f in fields(LayerStats)}
                base["y_tensor"] = res[0]
                req = ResidualStats(**base, skip=res[1], mask=an.output_mask(n, keep), shift=res[2])
                residual.add(n)
            reqs.append(SplitStats(req))
        accs = ctx.collect(reqs, model_x=cur, model_y=ctx.reference, desc=f"pfa refit {lv + 1}/{len(levels)}")
        for n in names:
            node, (cm_a, cm_b) = nodes[n], accs[n]
            mask = an.output_mask(n, keep)
            if mask is not None and not mask.all() and n not in residual:
                cm_a, cm_b = slice_outputs(cm_a, mask), slice_outputs(cm_b, mask)
            w0 = layer_matrix(node)[0]
            ridge = cfg.ridge
            if ridge < 0:  # pick the ridge that generalises best to the held-out batches
                ridge = RIDGES[2]
                if cm_b.n > 0 and cm_a.n > 0:
                    ridge = choose_ridge(cm_a, cm_b, w0 if cfg.prior else None)
                ridges[n] = ridge
            cm = merged(cm_a, cm_b)
            w, b = ridge_toward(cm, w0, ridge) if cfg.prior else ridge_solve(cm, ridge)
            errors[n] = relative_error(cm, w, b)
            write_layer(graph, node, w, b)
        cur = export_model(graph, like=pruned)
    return cur, errors, ridges
