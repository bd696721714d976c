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
    """The statistics of every reader: input features and outputs (``stats.LayerStats``); of a
    layer inside a subgraph with an ``outer_x``, the input features alone, from that tensor
    (``_with_outputs`` adds the outputs' side)."""
    if layer.outer_x is not None:
        return [layer.reader(layer.node).stats_request("pq:" + layer.node.name, x=layer.outer_x, y="",
                                                       positions=cfg.positions)]
    return [layer.reader(n).stats_request("pq:" + n.name, positions=cfg.positions) for n in layer.nodes]


def outer_twin(tensor, sub, main) -> str | None:
    """The name of a tensor of the main graph ``main`` that holds the values of ``tensor``, the
    input of a node inside the subgraph ``sub`` (an If branch, a Loop body), or None: ``tensor``
    itself when the subgraph reads it from the main graph, or the output of a main-graph node of
    the same op, attributes and inputs as the subgraph node that makes it from main-graph tensors
    (oww_hey_jarvis: its verifier, half of the quantized file, runs in an If branch on the input
    flattened as the main graph flattens it; its layers have no statistics of their own, and in
    weight space its 1536 × 64 Gemm needed 8-bit codes)."""
    made = {id(t) for n in sub.nodes for t in n.outputs}
    known = {id(t) for t in main.tensors().values()}
    if id(tensor) not in made:
        return tensor.name if id(tensor) in known else None
    node = next(n for n in sub.nodes if any(t is tensor for t in n.outputs))
    if not node.inputs or any(id(t) in made or id(t) not in known for t in node.inputs):
        return None
    for twin in main.nodes:
        if twin.op == node.op and twin.attrs == node.attrs and len(twin.inputs) == len(node.inputs) \
                and all(a is b for a, b in zip(twin.inputs, node.inputs)) and len(twin.outputs) == len(node.outputs):
            return twin.outputs[[t is tensor for t in node.outputs].index(True)].name
    return None


def moments(layer: Layer, got: dict, cfg):
    """(CrossMoments pooled over the readers, {reader name: CrossMoments}) from the collected
    ``requests``; a reader whose bias stays as it is on y − b."""
    fixed = not bias_fit(layer, cfg)
    per_node = {}
    for n in layer.nodes:
        cm = got["pq:" + n.name] if layer.outer_x is None else _with_outputs(layer, got["pq:" + n.name])
        per_node[n.name] = cm.minus_bias(fixed_bias(layer, n)) if fixed else cm
    return CrossMoments.pooled([per_node[n.name] for n in layer.nodes]), per_node


def _with_outputs(layer: Layer, cm: CrossMoments) -> CrossMoments:
    """The moments of (x, y) from those of x alone, with y = x·M + b the layer's own outputs
    (M = alpha·Tᵀ, b its bias as ``fixed_bias`` gives it): a layer with an ``outer_x`` has no
    output statistics, and its target is its own weight, so the y side is exact; with it the
    metric is the centred covariance and the bias takes the mean shift, as for any layer (with
    E[x xᵀ] as the metric and no bias refit oww_hey_jarvis's verifier, whose Gemm feeds a
    per-sample normalisation that removes the mean, moved its logits by up to 0.87 with the
    branch forced on)."""
    m = layer.alpha * layer.matrix().T.astype(np.float64)   # d_in × d_out
    b = fixed_bias(layer, layer.node)
    b = np.zeros(m.shape[1]) if b is None else b
    n, sx = cm.n, cm.x.sum
    sxx = cm.x.outer
    out = CrossMoments(m.shape[0], m.shape[1])
    out.x.merge(cm.x)
    sxm = sx @ m
    out.xy = sxx @ m + np.outer(sx, b)
    out.sum_y = sxm + n * b
    out.yy = np.einsum("ij,ij->j", m, sxx @ m) + 2 * b * sxm + n * b * b
    return out


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
