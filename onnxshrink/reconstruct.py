"""Older names of the shared rooms, kept importable while the passes move to them.

The least-squares refits live in ``lstsq`` (ridge with a relative α, pull toward W0, bias, relative
errors), a weight layer's layout, bias and writing in ``layers.WeightLayer``, the sequential refit
loop and its level order in ``refit``. The functions below are thin wrappers over those, with the
behaviour they had here; new code uses the rooms.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .layers import WeightLayer, conv_attrs  # noqa: F401  (re-exported)
from .lstsq import deterministic, fit_error, ridge_from_moments, ridge_solve  # noqa: F401  (re-exported)
from .refit import refit_order, shared_levels  # noqa: F401  (re-exported)
from .stats import LayerStats


def layer_matrix(node: gs.Node):
    """(M d_in × d_out, bias d_out or None) of a Conv, Gemm or MatMul node (a MatMul's bias Add is
    not read here): ``WeightLayer.matrix()`` and ``bias()``."""
    if node.op not in ("Conv", "Gemm", "MatMul"):
        raise ValueError(node.op)
    layer = WeightLayer(node)
    bias = None
    if node.op != "MatMul" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        bias = layer.bias()
    return layer.matrix(), bias


def set_layer_matrix(node: gs.Node, m, bias, in_shape_tail=None):
    """``WeightLayer.write``; a MatMul's bias goes through ``add_matmul_bias`` (ValueError here)."""
    if bias is not None and node.op == "MatMul":
        raise ValueError("MatMul has no bias input; add an Add node instead")
    WeightLayer(node).write(m, bias, kernel=in_shape_tail)


def add_matmul_bias(graph: gs.Graph, node: gs.Node, b) -> None:
    """``WeightLayer.add_bias`` of a MatMul: into its bias Add's constant, or a new Add."""
    WeightLayer(node, graph).add_bias(b)


def layer_stats_request(node: gs.Node, key: str, x_tensor: str, y_tensor: str | None, positions: int = 32,
                        rows_per_batch: int = 0) -> LayerStats:
    """``WeightLayer.stats_request`` for a group-1 Conv, a Gemm or a MatMul (ValueError otherwise)."""
    if node.op not in ("Conv", "Gemm", "MatMul"):
        raise ValueError(f"no layer statistics for op {node.op}")
    layer = WeightLayer(node)
    if node.op == "Conv" and layer.conv_attrs()["group"] != 1:
        raise ValueError("grouped Conv: refit per group is not supported by this helper")
    return layer.stats_request(key, x_tensor, y_tensor or "", positions=positions, rows_per_batch=rows_per_batch)
