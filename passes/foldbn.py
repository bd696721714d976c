"""foldbn: fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

Inference-mode BN is y = s ⊙ (x − μ) + β with s = γ / √(σ² + ε), per channel (axis 1). When x is
the output of a weight layer z = W * u + b used by nothing else, scaling the layer's output
channels gives the same function: W'[o] = s[o]·W[o], b'[o] = s[o]·(b[o] − μ[o]) + β[o].
Exact up to float rounding; no data needed.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import export_model, import_graph, read_values
from ..layers import WeightLayer, no_trans_a, per_column
from ..registry import Pass, PassReport, Plan, Requires, Skip


def _bn_scale_shift(bn: gs.Node):
    vals = [read_values(t).astype(np.float64) for t in bn.inputs[1:5]]
    gamma, beta, mean, var = vals
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - s * mean


def _check(bn: gs.Node, graph: gs.Graph, graph_outputs) -> tuple[WeightLayer | None, str | None]:
    """(the producer's layer, None) if the BN can be folded, else (None, reason)."""
    if bn.attrs.get("training_mode", 0):
        return None, "BatchNormalization in training mode"
    if len(bn.outputs) != 1:
        return None, "BatchNormalization with running-statistics outputs"
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None, "BatchNormalization parameters are not constants"
    x = bn.inputs[0]
    if not x.inputs:
        return None, "input is a graph input, no layer to fold into"
    prod = x.inputs[0]
    if prod.op not in ("Conv", "ConvTranspose", "Gemm"):
        return None, f"preceded by {prod.op}, not Conv/ConvTranspose/Gemm"
    if len(x.outputs) != 1 or x.name in graph_outputs:
        return None, f"output of '{prod.name}' has other consumers"
    layer = WeightLayer.of(prod, graph, no_trans_a, _not_shared, _per_channel_bias)
    if isinstance(layer, Skip):
        if layer.reason in ("weights are not constants", "bias is not a constant"):
            return None, f"weights of '{prod.name}' are not constants"
        return None, layer.reason
    return layer, None


def _not_shared(layer: WeightLayer) -> str | None:
    return f"weights of '{layer.name}' are shared with other nodes" if layer.is_shared else None


def _per_channel_bias(layer: WeightLayer) -> str | None:
    """A bias that adds one value per output channel (Gemm's C may be (N,), (1, N), a scalar, ...;
    (M, N) with M > 1 is a bias per row)."""
    c = layer.node.inputs[2] if len(layer.node.inputs) > 2 and layer.node.inputs[2].name else None
    if c is not None and not per_column(c.shape, layer.d_out):
        return f"bias of '{layer.name}' (shape {tuple(c.shape)}) is not per-channel"
    return None


def _fold(layer: WeightLayer, s: np.ndarray, t: np.ndarray):
    """Scale the layer's output channels by s and shift them by t: W' = W·diag(s), b' = s ⊙ b + t."""
    b = layer.bias()
    layer.write(layer.matrix() * s, s * (np.zeros(len(s)) if b is None else b) + t)


class FoldBN(Pass):
    name = "foldbn"
    summary = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm (exact)"
    requires = Requires(data=False)

    def _scan(self, graph):
        outs = {t.name for t in graph.outputs}
        for node in graph.nodes:
            if node.op == "BatchNormalization":
                layer, reason = _check(node, graph, outs)
                yield node, layer, reason

    def plan(self, model, cfg):
        plan = Plan()
        for bn, layer, reason in self._scan(import_graph(model)):
            if layer is None:
                plan.skipped.append(Skip(bn.name, reason))
            else:
                plan.nodes.append(bn.name)
        return plan

    def apply(self, model, cfg, ctx):
        graph = import_graph(model)
        report = PassReport(self.name)
        for bn, layer, reason in list(self._scan(graph)):
            if layer is None:
                report.skip(bn, reason)
                continue
            frozen = getattr(ctx, "frozen", frozenset())
            if bn.name in frozen or layer.node.name in frozen:   # the user's keep: both stay as they are
                report.skip(bn, ctx.protected.get(bn.name) or ctx.protected.get(layer.node.name))
                continue
            s, t = _bn_scale_shift(bn)
            _fold(layer, s, t)
            prod = layer.node
            y = bn.outputs[0]
            prod.outputs[0] = y  # the layer now writes the BN's output tensor directly
            bn.outputs.clear()
            bn.inputs.clear()
            report.changed.append(f"{bn.name} -> {prod.name}")
        return export_model(graph, like=model), report
