"""basisconv: replace a k×k Conv by M basis filters (k×k Conv) and a 1×1 Conv of coefficients.

BasisConv (Tayyab & Mahalanobis, "BasisConv: A method for compressed representation and learning
in CNNs"): flatten the O filters of a Conv to the columns of W (C·k² × O); with a basis
A (C·k² × M) and coefficients B (M × O), W ≈ A B, the layer becomes Conv(C→M, k×k, the same
stride/pads/dilation, no bias) then Conv(M→O, 1×1, bias). It pays when M·(C·k² + O) < O·C·k²
(per group for grouped convs: M·(C/g·k² + O/g) < O/g·C/g·k²).

Post-training version (no fine-tuning): the basis is the whitened SVD of W under the im2col patch
covariance Σ of the layer's input (so it keeps the layer's *output*, not its weights), and the
1×1 coefficients and bias are refit by least squares on calibration outputs, layer by layer on
the already-rewritten network (see ``_factor``). M per layer by singular-value energy, or by the
global FLOP budget with ranks allocated across layers by output error per FLOP saved; M is a
multiple of ``channel_multiple``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Emitter
from ..layers import WeightLayer, explicit_pads, float_weights, not_shared, ops
from ..registry import Skip
from ..stats import LayerStats
from . import _factor


@dataclass
class BasisConvConfig(_factor.FactorConfig):
    channel_multiple: int = 8     # M is rounded up to a multiple of this
    off_multiple: bool = True     # budget: one layer's M may end off the multiple where a whole step would
                                  # overshoot the goal (_factor.fine_give_back)
    measured: bool = False        # budget: scale each layer's error curve by its measured effect on the
                                  # model's outputs (held out: two runs per probe, _factor.output_effect); opt-in: the
                                  # probe at half the rank misjudges deep cuts (digits cnn_plain@0.4: 98.67 -> 89.56 %)


def _check(node: gs.Node, graph: gs.Graph, info: dict):
    """(attrs, None) when the Conv can be rewritten, else (None, reason)."""
    layer = WeightLayer.of(node, graph, ops("Conv"), float_weights, not_shared, explicit_pads)
    if isinstance(layer, Skip):
        return None, layer.reason
    attrs = layer.conv_attrs()
    if all(k == 1 for k in attrs["kernel_shape"]):
        return None, "1×1 kernel: nothing to factor"
    y_shape = info.get(node.outputs[0].name, (None, None))[0]
    if y_shape is None:
        return None, "output shape unknown"
    return attrs, None


def _layer(node: gs.Node, attrs: dict, info: dict, cfg) -> _factor.FactorLayer:
    w = node.inputs[1].values.astype(np.float64)
    o, cg = w.shape[:2]
    g = attrs["group"]
    og = o // g
    k = int(np.prod(w.shape[2:]))
    p = int(np.prod(info[node.outputs[0].name][0][2:]))
    has_bias = len(node.inputs) > 2
    new_bias = has_bias or cfg.refit or cfg.whiten
    ws = [w[i * og:(i + 1) * og].reshape(og, -1).T for i in range(g)]
    bias = node.inputs[2].values.astype(np.float64) if has_bias else None
    stat_attrs = {key: attrs[key] for key in ("kernel_shape", "strides", "dilations", "pads")}

    def request(key, x, y):
        return LayerStats(key, x, y, kind="conv", conv_attrs=stat_attrs, positions=cfg.positions)

    def cost_at(m):
        flops = 2 * g * m * p * cg * k + 2 * o * p * m + (o * p if new_bias else 0)
        params = g * m * cg * k + o * m + (o if new_bias else 0)
        return {"flops": flops, "params": params}

    cost0 = {"flops": 2 * o * p * cg * k + (o * p if has_bias else 0), "params": o * cg * k + (o if has_bias else 0)}
    layer = _factor.FactorLayer(node.name, node.inputs[0].name, node.outputs[0].name, ws, bias, True, request,
                          cost0, cost_at, min(cg * k, og))
    layer.extra["in_slices"] = [slice(i * cg * k, (i + 1) * cg * k) for i in range(g)]
    layer.extra["out_slices"] = [slice(i * og, (i + 1) * og) for i in range(g)]
    layer.extra["attrs"] = attrs
    return layer


def _rewrite(graph, layer, m, As, Bs, bias):
    node = next(n for n in graph.nodes if n.name == layer.node)
    attrs = layer.extra["attrs"]
    w = node.inputs[1].values
    dtype = w.dtype
    o, cg = w.shape[:2]
    kshape = list(w.shape[2:])
    nd = len(kshape)
    g = attrs["group"]
    basis_w = np.concatenate([a.T.reshape([m, cg] + kshape) for a in As]).astype(dtype)
    coef_w = np.concatenate([b.T for b in Bs]).reshape([o, m] + [1] * nd).astype(dtype)
    em = Emitter(graph, dtype=dtype)
    z = em.variable("", node.outputs[0].dtype or np.float32, name=node.name + "_basis_out")
    em.op("Conv", [node.inputs[0], em.const(basis_w, name=node.name + "_basis_w")], out=z, name=node.name + "_basis",
          attrs={"kernel_shape": kshape, "strides": attrs["strides"], "pads": attrs["pads"],
                 "dilations": attrs["dilations"], "group": g})
    inputs = [z, em.const(coef_w, name=node.inputs[1].name + "_coef")]
    if bias is not None:
        # named after the node: the old bias may be shared with other layers
        inputs.append(em.const(bias, name=node.name + "_coef_b"))
    node.inputs.clear()
    node.inputs.extend(inputs)
    node.attrs = {"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd),
                  "dilations": [1] * nd, "group": g}
    return None


def find_layers(graph, info, cfg):
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op != "Conv":
            continue
        attrs, reason = _check(node, graph, info)
        if attrs is None:
            if reason != "1×1 kernel: nothing to factor":
                skipped.append((node.name, reason))
            continue
        layer = _layer(node, attrs, info, cfg)
        if attrs["group"] > 1 and not cfg.force and not _factor.candidate_ranks(layer, cfg.channel_multiple):
            skipped.append((node.name, f"grouped Conv (group {attrs['group']}, {layer.ws[0].shape[0]} inputs "
                                       f"per filter): no per-group basis of a multiple of "
                                       f"{cfg.channel_multiple} filters saves FLOPs"))
            continue
        layers.append(layer)
    return layers, skipped


class BasisConv(_factor.FactorPass):
    name = "basisconv"
    summary = "split a k×k Conv into M basis filters plus a 1×1 Conv (whitened SVD + refit)"
    Config = BasisConvConfig
    multiple_option = "channel_multiple"
    find_layers = staticmethod(find_layers)
    rewrite = staticmethod(_rewrite)
