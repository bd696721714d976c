"""lowrank: factorize Gemm/MatMul weights (and optionally Conv kernels) into two thinner layers.

A layer y = x W + b with a constant W (d_in × d_out) becomes y = (x A) B + b with A d_in × r,
B r × d_out: MatMul(d_in→r) then Gemm/MatMul(r→d_out) keeping the bias. It pays when
r·(d_in + d_out) < d_in·d_out.

Data-aware truncated SVD (Zhang et al. 2015, "Accelerating very deep convolutional networks for
classification and detection"; Denton et al. 2014 for the plain SVD): with S = chol(E[x xᵀ] + εI),
SVD(Sᵀ W) = U Σ Vᵀ, keep rank r: A = S⁻ᵀ U_r, B = Σ_r V_rᵀ, which minimises the output error
E‖x(W − A B)‖². Then B and the bias are refit by least squares on calibration data, layer by
layer on the already-rewritten network (``_factor``), with a ridge toward the truncated B chosen on
calibration rows held out from the fit (``_factor.held_out_ridge``). Rank per layer by whitened energy, or by
``--target-params`` / ``--target-flops`` with ranks allocated across layers by output error per
parameter/FLOP saved (``effect=stream``: in a transformer, each layer's relative error weighed by
its block's contribution to the residual stream).

Option ``conv=true``: a k_h×k_w Conv becomes a k_h×1 Conv to r channels then a 1×k_w Conv
(Jaderberg, Vedaldi & Zisserman 2014, "Speeding up convolutional neural networks with low rank
expansions", scheme 2): W[o, c, i, j] as the matrix M[(c, i), (o, j)] ≈ V H, V from the SVD whitened
by the vertical-patch covariance, H refit by least squares on the 1×k_w patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Emitter, set_constant_input
from ..layers import WeightLayer, explicit_pads, float_weights, no_trans_a, not_shared, per_column_bias
from ..registry import Skip
from ..stats import LayerStats
from . import _factor


@dataclass
class LowRankConfig(_factor.FactorConfig):
    rank_multiple: int = 8        # r is rounded up to a multiple of this
    ridge: float = -1.0           # the second factor's refit: ridge chosen per layer on held-out rows, toward
                                  # the truncated factor (``_factor.held_out_ridge``); >= 0: that relative ridge
                                  # toward zero (vit_focus at params 0.9: map IoU 0.898 with 1e-4, 0.904 chosen)
    conv: bool = False            # also split k×k Convs into k×1 then 1×k (spatially separable)
    effect: str = "layer"         # budget allocation: "layer" sums the layers' relative errors; "stream"
                                  # weighs each by its residual block's contribution to the stream where
                                  # every layer is in one (``_factor.stream_effects``; on a ViT whose early
                                  # blocks' errors grow on the way to the output it does worse)
    measured: bool = False        # budget: scale each layer's error curve by its measured effect on the
                                  # model's outputs (held out: two runs per probe, _factor.output_effect)

    def __post_init__(self):
        super().__post_init__()
        if self.effect not in ("stream", "layer"):
            raise ValueError(f"effect must be stream or layer, got '{self.effect}'")


# a Conv whose kernel is not 2-D (an STFT written as Conv1d): lowrank.conv splits k_h×k_w kernels only
ONE_D_CONV = ("not a 2-D kernel: lowrank splits Gemm/MatMul weights and (lowrank.conv=true) k×k Conv kernels; "
              "a Conv's factorization into basis filters and a 1×1 Conv is basisconv's")


def _numel(shape):
    return int(np.prod(shape))


def _linear_layer(node, graph, info, cfg):
    wl = WeightLayer.of(node, graph, float_weights, no_trans_a, per_column_bias)
    if isinstance(wl, Skip):
        return None, wl.reason
    y_shape = info.get(node.outputs[0].name, (None, None))[0]
    x_shape = info.get(node.inputs[0].name, (None, None))[0]
    if y_shape is None or x_shape is None:
        return None, "input or output shape unknown"
    w, bias = wl.matrix(), (wl.bias() if node.op == "Gemm" else None)
    d_in, d_out = w.shape
    if x_shape[-1] != d_in or y_shape[-1] != d_out:
        return None, "operand shapes do not match a row-times-matrix product"
    rows = _numel(y_shape) // d_out
    add = None
    if node.op == "Gemm":
        has_bias, fit_bias = bias is not None, True
    else:
        add = wl.bias_add
        has_bias, fit_bias = False, add is not None
    new_bias = node.op == "Gemm" and (has_bias or cfg.refit or cfg.whiten)

    def request(key, x, y):
        return LayerStats(key, x, y, kind="linear")

    def cost_at(r):
        return {"flops": 2 * rows * r * (d_in + d_out) + (rows * d_out if new_bias else 0),
                "params": r * (d_in + d_out) + (d_out if new_bias else 0)}

    cost0 = {"flops": 2 * rows * d_in * d_out + (rows * d_out if has_bias else 0),
             "params": d_in * d_out + (d_out if has_bias else 0)}
    layer = _factor.FactorLayer(node.name, node.inputs[0].name, node.outputs[0].name, [w], bias, fit_bias, request,
                          cost0, cost_at, min(d_in, d_out))
    layer.extra.update(in_slices=[slice(None)], out_slices=[slice(None)], kind="linear",
                       add=add.name if add is not None else None)
    return layer, None


def _conv_layer(node, graph, info, cfg):
    wl = WeightLayer.of(node, graph, not_shared, explicit_pads)
    if isinstance(wl, Skip):
        return None, wl.reason
    w = wl.weight.values.astype(np.float64)
    if w.ndim != 4:
        return None, ONE_D_CONV
    attrs = wl.conv_attrs()
    if attrs["group"] != 1:
        return None, f"grouped Conv (group {attrs['group']}): no separable split"
    o, c, kh, kw = w.shape
    if kh == 1 or kw == 1:
        return None, f"{kh}×{kw} kernel is already separable"
    y_shape = info.get(node.outputs[0].name, (None, None))[0]
    x_shape = info.get(node.inputs[0].name, (None, None))[0]
    if y_shape is None or x_shape is None:
        return None, "input or output shape unknown"
    ho, wo = y_shape[2:]
    wi = x_shape[3]
    has_bias = len(node.inputs) > 2
    new_bias = has_bias or cfg.refit
    m = w.transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
    bias = node.inputs[2].values.astype(np.float64) if has_bias else None
    stat_attrs = {key: attrs[key] for key in ("kernel_shape", "strides", "dilations", "pads")}

    def request(key, x, y):
        return LayerStats(key, x, y, kind="conv", conv_attrs=stat_attrs, positions=cfg.positions)

    def cost_at(r):
        return {"flops": 2 * r * ho * wi * c * kh + 2 * o * ho * wo * r * kw + (o * ho * wo if new_bias else 0),
                "params": r * c * kh + o * r * kw + (o if new_bias else 0)}

    def vertical(cov, mean):
        cv = cov.reshape(c, kh, kw, c, kh, kw)
        cv = np.einsum("aibcjb->aicj", cv) / kw
        return cv.reshape(c * kh, c * kh), mean.reshape(c, kh, kw).mean(axis=2).reshape(-1)

    cost0 = {"flops": 2 * o * ho * wo * c * kh * kw + (o * ho * wo if has_bias else 0),
             "params": o * c * kh * kw + (o if has_bias else 0)}
    layer = _factor.FactorLayer(node.name, node.inputs[0].name, node.outputs[0].name, [m], bias, True, request,
                          cost0, cost_at, min(c * kh, o * kw), feature_map=vertical)
    layer.extra.update(in_slices=[slice(None)], out_slices=[slice(None)], kind="conv", attrs=attrs)
    return layer, None


def _shared_linear_layer(nodes, graph, info, cfg):
    """One layer for a weight several Gemm/MatMul nodes read (an unrolled RNN, tied matrices):
    factorized once from the pooled input statistics of all readers; each reader becomes two
    products reading the shared factors. None and why when the readers differ in kind or layout."""
    w_t = nodes[0].inputs[1]
    why = f"weights shared by {len(nodes)} nodes"
    layers = []
    for n in nodes:
        if n.op not in ("Gemm", "MatMul") or len(n.inputs) < 2 or n.inputs[1] is not w_t:
            return None, f"{why}, one of them {n.name} ({n.op}) not reading it as a Gemm/MatMul weight"
        layer, reason = _linear_layer(n, graph, info, cfg)
        if layer is None:
            return None, f"{why}; {n.name}: {reason}"
        layers.append(layer)
    first = nodes[0]
    key = lambda n: (n.op, int(n.attrs.get("transB", 0)), float(n.attrs.get("alpha", 1.0)),  # noqa: E731
                     len(n.inputs) > 2 and n.op == "Gemm")
    if any(key(n) != key(first) for n in nodes) or len({l.fit_bias for l in layers}) > 1:
        return None, f"{why} of different kinds or layouts ({', '.join(n.name + ' ' + n.op for n in nodes)})"
    base = layers[0]
    readers = [(l.node, l.x, l.y) for l in layers]
    flops0 = sum(l.cost0["flops"] for l in layers)
    bias_params = base.cost0["params"] - base.ws[0].size

    def cost_at(r):
        params = r * sum(base.ws[0].shape) + (base.cost_at(r)["params"] - r * sum(base.ws[0].shape))
        return {"flops": sum(l.cost_at(r)["flops"] for l in layers), "params": params}

    shared_bias = first.op == "Gemm" and len(first.inputs) > 2 and all(n.inputs[2] is first.inputs[2] for n in nodes) \
        and {id(c) for c in first.inputs[2].outputs} == {id(n) for n in nodes}
    layer = _factor.FactorLayer(first.name, base.x, base.y, base.ws, base.bias, base.fit_bias, base.request,
                          {"flops": flops0, "params": base.ws[0].size + bias_params}, cost_at, base.max_rank,
                          readers=readers)
    layer.extra.update(in_slices=[slice(None)], out_slices=[slice(None)], kind="linear",
                       adds={l.node: l.extra["add"] for l in layers}, shared_bias=shared_bias,
                       biases={l.node: l.bias for l in layers})
    return layer, None


def _rewrite_shared(graph, layer, r, a, b, bias):
    """Every reader x → MatMul(x, A) → Gemm/MatMul(·, B): A and B one constant each, read by all."""
    nodes = {n.name: n for n in graph.nodes}
    first = nodes[layer.node]
    dtype = first.inputs[1].values.dtype
    em = Emitter(graph, dtype=dtype)
    a_c = em.const(a, name=first.inputs[1].name + "_lowrank_a")
    b_c = em.const(b.T if first.op == "Gemm" and first.attrs.get("transB", 0) else b, name=first.inputs[1].name + "_lowrank_b")
    per_reader = layer.extra.get("reader_bias") or {}
    shared_b = None
    if first.op == "Gemm" and layer.extra["shared_bias"] and bias is not None:
        shared_b = gs.Constant(first.inputs[2].name, np.ascontiguousarray(bias.astype(first.inputs[2].values.dtype)))
    em = Emitter(graph)
    for rn, _, _ in layer.sources:
        node = nodes[rn]
        z = em.variable("", node.outputs[0].dtype or np.float32, name=node.name + "_lowrank_out")
        em.op("MatMul", [node.inputs[0], a_c], out=z, name=node.name + "_lowrank_a")
        node.inputs[0] = z
        node.inputs[1] = b_c
        own = per_reader.get(rn, bias)
        if node.op == "Gemm":
            node.attrs["alpha"] = 1.0
            if shared_b is not None:
                node.inputs[2] = shared_b
                node.attrs["beta"] = 1.0
            elif own is not None:
                node.attrs["beta"] = 1.0
                set_constant_input(node, 2, own.astype(dtype), base=node.name + "_bias")
        elif layer.extra["adds"].get(rn) is not None and own is not None:
            WeightLayer(node, graph).add_bias(own - (layer.extra["biases"][rn] if layer.extra["biases"][rn] is not None else 0))
    return None


def _rewrite(graph, layer, r, As, Bs, bias):
    if len(layer.sources) > 1:
        return _rewrite_shared(graph, layer, r, As[0], Bs[0], bias)
    node = next(n for n in graph.nodes if n.name == layer.node)
    a, b = As[0], Bs[0]
    dtype = node.inputs[1].values.dtype
    out_dtype = node.outputs[0].dtype or np.float32
    em = Emitter(graph, dtype=dtype)
    z = em.variable("", out_dtype, name=node.name + "_lowrank_out")
    if layer.extra["kind"] == "conv":
        attrs = layer.extra["attrs"]
        o, c, kh, kw = node.inputs[1].values.shape
        s, p, d = attrs["strides"], attrs["pads"], attrs["dilations"]
        vertical_w = em.const(a.T.reshape(r, c, kh, 1), name=node.name + "_vertical_w")
        em.op("Conv", [node.inputs[0], vertical_w], out=z, name=node.name + "_vertical",
              attrs={"kernel_shape": [kh, 1], "strides": [s[0], 1], "pads": [p[0], 0, p[2], 0],
                     "dilations": [d[0], 1], "group": 1})
        hw = b.reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]
        inputs = [z, em.const(hw, name=node.inputs[1].name + "_horizontal")]
        if bias is not None:
            inputs.append(em.const(bias, name=node.name + "_horizontal_b"))
        node.inputs.clear()
        node.inputs.extend(inputs)
        node.attrs = {"kernel_shape": [1, kw], "strides": [1, s[1]], "pads": [0, p[1], 0, p[3]],
                      "dilations": [1, d[1]], "group": 1}
        return node.name
    em.op("MatMul", [node.inputs[0], em.const(a, name=node.name + "_lowrank_a_w")], out=z,
          name=node.name + "_lowrank_a")
    node.inputs[0] = z
    wl = WeightLayer(node, graph)
    wl.write(b, bias if node.op == "Gemm" else None)
    if node.op == "MatMul" and layer.extra.get("add") is not None and bias is not None:
        wl.add_bias(bias)
    return None


def find_layers(graph, info, cfg):
    layers, skipped, seen = [], [], set()
    for node in graph.nodes:
        if node.op in ("Gemm", "MatMul"):
            if node.op == "MatMul" and isinstance(node.inputs[0], gs.Constant) \
                    and not isinstance(node.inputs[1], gs.Constant):
                layer, reason = None, "constant weight on the left (W·x): not supported"
            elif len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
                continue  # a product of two activations (attention), not a weight layer
            elif len(node.inputs[1].outputs) > 1:
                w_t = node.inputs[1]
                if id(w_t) in seen:
                    continue  # handled with its first reader
                seen.add(id(w_t))
                readers = list(w_t.outputs)
                layer, reason = _shared_linear_layer(readers, graph, info, cfg)
                if layer is None:
                    skipped.extend((n.name, reason) for n in readers)
                    continue
            else:
                layer, reason = _linear_layer(node, graph, info, cfg)
        elif node.op == "Conv":
            if not cfg.conv:
                if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                    skipped.append((node.name, ONE_D_CONV if node.inputs[1].values.ndim != 4
                                    else "Conv layers need lowrank.conv=true"))
                continue
            layer, reason = _conv_layer(node, graph, info, cfg)
            if reason is not None and "already separable" in reason:
                skipped.append((node.name, reason + " (lowrank.conv splits k×k kernels only)"))
                continue
        else:
            continue
        if layer is None:
            skipped.append((node.name, reason))
        else:
            layers.append(layer)
    return layers, skipped


class LowRank(_factor.FactorPass):
    name = "lowrank"
    summary = "factorize Gemm/MatMul (and k×k Conv) weights into two thinner layers (whitened SVD + refit)"
    Config = LowRankConfig
    multiple_option = "rank_multiple"
    find_layers = staticmethod(find_layers)
    rewrite = staticmethod(_rewrite)
