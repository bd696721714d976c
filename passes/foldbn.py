"""foldbn: fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

Inference-mode BN is y = s ⊙ (x − μ) + β with s = γ / √(σ² + ε), per channel (axis 1). When x is
the output of a weight layer z = W * u + b used by nothing else, scaling the layer's output
channels gives the same function: W'[o] = s[o]·W[o], b'[o] = s[o]·(b[o] − μ[o]) + β[o].
Exact up to float rounding; no data needed.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import export_model, import_graph, read_values, set_constant_input
from ..registry import Pass, PassReport, Plan, Requires, Skip


def _bn_scale_shift(bn: gs.Node):
    vals = [read_values(t).astype(np.float64) for t in bn.inputs[1:5]]
    gamma, beta, mean, var = vals
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - s * mean


def _check(bn: gs.Node, graph_outputs) -> tuple[gs.Node | None, str | None]:
    """(producer, None) if the BN can be folded, else (None, reason)."""
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
    if not isinstance(prod.inputs[1], gs.Constant) or (len(prod.inputs) > 2 and not isinstance(prod.inputs[2], gs.Constant)):
        return None, f"weights of '{prod.name}' are not constants"
    if prod.op == "Gemm" and prod.attrs.get("transA", 0):
        return None, "Gemm with transA=1"
    if len(prod.inputs[1].outputs) > 1:
        return None, f"weights of '{prod.name}' are shared with other nodes"
    if len(prod.inputs) > 2 and not _per_channel(prod.inputs[2].shape, _n_out(prod)):
        return None, f"bias of '{prod.name}' (shape {tuple(prod.inputs[2].shape)}) is not per-channel"
    return prod, None


def _n_out(prod: gs.Node) -> int:
    """Output channels of the layer: Conv W (O, C/g, k..), ConvTranspose W (C, O/g, k..), Gemm B."""
    shape = prod.inputs[1].shape
    if prod.op == "ConvTranspose":
        return shape[1] * int(prod.attrs.get("group", 1))
    if prod.op == "Gemm":
        return shape[0] if prod.attrs.get("transB", 0) else shape[1]
    return shape[0]


def _per_channel(shape, n_out) -> bool:
    """A bias of this shape adds one value per output channel (Gemm's C may be (N,), (1, N), a
    scalar, ...; (M, N) with M > 1 is a bias per row)."""
    shape = tuple(shape)
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, n_out))


def _fold(graph: gs.Graph, prod: gs.Node, s: np.ndarray, t: np.ndarray):
    w = read_values(prod.inputs[1])
    dtype = w.dtype
    w = w.astype(np.float64)
    n_out = s.shape[0]
    if prod.op == "Conv":
        w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif prod.op == "ConvTranspose":
        g = int(prod.attrs.get("group", 1))
        shp = w.shape
        w = w.reshape((g, shp[0] // g, shp[1]) + shp[2:]) * s.reshape((g, 1, shp[1]) + (1,) * (len(shp) - 2))
        w = w.reshape(shp)
    else:  # Gemm: output column o
        w = w * prod.attrs.get("alpha", 1.0)
        w = w * (s[:, None] if prod.attrs.get("transB", 0) else s[None, :])
        prod.attrs["alpha"] = 1.0
    b = np.zeros(n_out)
    if len(prod.inputs) > 2:
        beta = prod.attrs.get("beta", 1.0) if prod.op == "Gemm" else 1.0
        b = np.broadcast_to(read_values(prod.inputs[2]).astype(np.float64).reshape(-1) * beta, (n_out,))
    if prod.op == "Gemm":
        prod.attrs["beta"] = 1.0
    set_constant_input(prod, 1, w.astype(dtype), graph)
    set_constant_input(prod, 2, (s * b + t).astype(dtype), graph, base=prod.name + "_bias")


class FoldBN(Pass):
    name = "foldbn"
    summary = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm (exact)"
    requires = Requires(data=False)

    def _scan(self, graph):
        outs = {t.name for t in graph.outputs}
        for node in graph.nodes:
            if node.op == "BatchNormalization":
                prod, reason = _check(node, outs)
                yield node, prod, reason

    def plan(self, model, cfg):
        plan = Plan()
        for bn, prod, reason in self._scan(import_graph(model)):
            if prod is None:
                plan.skipped.append(Skip(bn.name, reason))
            else:
                plan.targets.append(bn.name)
        return plan

    def apply(self, model, cfg, ctx):
        graph = import_graph(model)
        report = PassReport(self.name)
        for bn, prod, reason in list(self._scan(graph)):
            if prod is None:
                report.skip(bn, reason)
                continue
            s, t = _bn_scale_shift(bn)
            _fold(graph, prod, s, t)
            y = bn.outputs[0]
            prod.outputs[0] = y  # the layer now writes the BN's output tensor directly
            bn.outputs.clear()
            bn.inputs.clear()
            report.changed.append(f"{bn.name} -> {prod.name}")
        return export_model(graph, like=model), report
