"""What a layer is quantized toward: the target weights T* and the metric H, from statistics.

With X̃ a layer's inputs in the network quantized so far and Y its outputs in the original one
(sequential reconstruction), the target is the ridge fit pulled toward the current weights W,
    W* = argmin ‖X̃ W* − Y‖² + λ‖W* − W‖²,   (H + λI) W* = Cov(x̃, y) + λ W,
with H = Cov(x̃) (the second moment when the bias is not refit) and λ = damp · mean diagonal of
H; the metric of the quantization is H + λI, since ‖X̃ (W* − Ŵ)‖² = Σ_j (w*_j − ŵ_j)ᵀ H (w*_j − ŵ_j).
When W already reproduces Y (the layer's inputs are unchanged) the target is W itself.
"""

from __future__ import annotations

import numpy as np

from ...reconstruct import layer_stats_request
from ...stats import CrossMoments
from .layer import Layer, bias_fit, fixed_bias


def gather(ctx, layers, cfg, model_x):
    """({layer name: CrossMoments pooled over its readers}, {reader name: CrossMoments}): the
    input features (from ``model_x``) and the outputs in the reference model of every reader."""
    reqs = [layer_stats_request(n, "pq:" + n.name, n.inputs[0].name, n.outputs[0].name, positions=cfg.positions)
            for layer in layers for n in layer.nodes]
    if not reqs:
        return {}, {}
    got = ctx.collect(reqs, model_x=model_x, model_y=ctx.reference, desc="pq statistics")
    per_node = {}
    for layer in layers:
        fixed = not bias_fit(layer, cfg)
        for n in layer.nodes:
            cm = got["pq:" + n.name]
            per_node[n.name] = _without_bias(cm, fixed_bias(layer, n)) if fixed else cm
    return {layer.node.name: CrossMoments.pooled([per_node[n.name] for n in layer.nodes]) for layer in layers}, per_node


def _without_bias(cm, b):
    """The moments of (x, y − b): the target of a layer whose bias stays as it is is its product."""
    if b is None or not np.any(b):
        return cm
    out = CrossMoments(len(cm.x.mean), len(cm.sum_y))
    out.x.merge(cm.x)
    n = cm.n
    out.sum_y = cm.sum_y - n * b
    out.xy = cm.xy - np.outer(cm.x.sum, b)
    out.yy = cm.yy - 2 * b * cm.sum_y + n * b * b
    return out


def layer_problem(layer: Layer, cm, cfg):
    """(target T* rows × d_in, metric H or None, bias refit or not): what to quantize."""
    t = layer.matrix().astype(np.float64)
    if cm is None:
        return t, None, False
    alpha = layer.alpha
    bias = bias_fit(layer, cfg)
    n = max(cm.n, 1)
    if bias:
        h = cm.x.cov
        cxy = cm.xy / n - np.outer(cm.x.mean, cm.mean_y)
    else:
        h = cm.x.second
        cxy = cm.xy / n
    lam = cfg.damp * max(float(np.trace(h)) / len(h), 1e-12)
    hd = h + lam * np.eye(len(h))
    m = alpha * t.T
    exact = np.linalg.norm(cxy - h @ m) <= 1e-5 * max(np.linalg.norm(cxy), 1e-30)
    if cfg.sequential and cfg.aware and not exact:
        m = np.linalg.solve(hd, cxy + lam * m)
        t = m.T / alpha
    return t, hd, bias
