"""What a layer is quantized toward: the target weights T* and the metric H, from statistics.

With X̃ a layer's inputs in the network quantized so far and Y its outputs in the original one
(sequential reconstruction), the target is the ridge fit pulled toward the current weights W
(``lstsq.ridge_from_moments`` with W0 = W),
    W* = argmin ‖X̃ W* − Y‖² + λ‖W* − W‖²,   (H + λI) W* = Cov(x̃, y) + λ W,
with H = Cov(x̃) (the second moment when the bias is not refit) and λ = damp · mean diagonal of
H; the metric of the quantization is H + λI, since ‖X̃ (W* − Ŵ)‖² = Σ_j (w*_j − ŵ_j)ᵀ H (w*_j − ŵ_j).
When W already reproduces Y (the layer's inputs are unchanged) the target is W itself, and so it
is when the statistics hold fewer than ``ROWS_PER_FEATURE`` · d_in rows: a least-squares fit on n
rows of d features follows their noise by about d/n of its gain, and a target fitted to the
calibration rows then moves the held-out outputs away from the original instead of back to it
(oww_embedding: its last Conv sees 48 rows of 288 features, the layers before it 768 of 216-288;
with such targets the worst held-out cosine is 0.9944, with W as the target 1.0000, at the same
bytes). Nor is it used where it moves the layer's calibration outputs by less than
``MIN_REFIT_CHANGE`` (relative squared change, ‖X̃ (W* − W)‖² / ‖X̃ W*‖²): the inputs drifted too
little for the fit to win anything back, and what it changes lies in directions the calibration
data barely excites (oww_melspec: the mel MatMul after its 8-bit STFT Convs, a change of 1.5e-8
on the calibration data, sent quiet mel bins of held-out clips 30–40 dB low, range error 0.61;
with W as the target 0.009, 1 − worst rel. L2 0.999; the smallest change of a layer the
sequential target serves in mtcnn_onet and oww_embedding: 5e-5).
A reader whose bias stays as it is is fitted on y − b.
"""

from __future__ import annotations

import numpy as np

from ...lstsq import relative_alpha, ridge_from_moments
from ...stats import CrossMoments
from .layer import Layer, bias_fit, fixed_bias


ROWS_PER_FEATURE = 4   # the sequential target needs at least this many statistics rows per input feature
MIN_REFIT_CHANGE = 1e-6   # a sequential target moving the calibration outputs less than this (relative) is not used


def requests(layer: Layer, cfg) -> list:
    """The statistics of every reader: input features and outputs (``stats.LayerStats``)."""
    return [layer.reader(n).stats_request("pq:" + n.name, positions=cfg.positions) for n in layer.nodes]


def moments(layer: Layer, got: dict, cfg):
    """(CrossMoments pooled over the readers, {reader name: CrossMoments}) from the collected
    ``requests``; a reader whose bias stays as it is on y − b."""
    fixed = not bias_fit(layer, cfg)
    per_node = {}
    for n in layer.nodes:
        cm = got["pq:" + n.name]
        per_node[n.name] = cm.minus_bias(fixed_bias(layer, n)) if fixed else cm
    return CrossMoments.pooled([per_node[n.name] for n in layer.nodes]), per_node


def gather(ctx, layers, cfg, model_x) -> dict:
    """{layer name: pooled CrossMoments}: input features from ``model_x``, outputs from the
    reference model."""
    reqs = [r for layer in layers for r in requests(layer, cfg)]
    if not reqs:
        return {}
    got = ctx.collect(reqs, model_x=model_x, model_y=ctx.reference, desc="pq statistics")
    return {layer.node.name: moments(layer, got, cfg)[0] for layer in layers}


def layer_problem(layer: Layer, cm, cfg):
    """(target T* rows × d_in, metric H or None, bias refit or not): what to quantize."""
    t = layer.matrix().astype(np.float64)
    if cm is None:
        return t, None, False
    alpha = layer.alpha
    bias = bias_fit(layer, cfg)
    h, cxy, mx, my = cm.moments(centered=bias)
    hd = h + relative_alpha(h, cfg.damp) * np.eye(len(h))
    m = alpha * t.T
    exact = np.linalg.norm(cxy - h @ m) <= 1e-5 * max(np.linalg.norm(cxy), 1e-30)
    if cfg.sequential and cfg.aware and not exact and cm.n >= ROWS_PER_FEATURE * len(h):
        fit = ridge_from_moments(h, cxy, mx, my, cfg.damp, bias, w0=m)[0]
        change = fit - m
        if float(np.sum((h @ change) * change)) >= MIN_REFIT_CHANGE * float(np.sum((h @ fit) * fit)):
            m = fit
            t = m.T / alpha
    return t, hd, bias
