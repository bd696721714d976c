"""Least-squares refits shared by the passes.

A weight layer computes y = x W + b with x a feature row (an im2col patch row for a Conv, an input
row for Gemm/MatMul) and W (d_in × d_out). After a structural change upstream, the layer's inputs
are different; reconstruction refits W and b so that the new layer, fed by the *rewritten*
network's activations x̃, reproduces the *original* network's pre-activation y:

    W', b' = argmin ‖X̃ W' + 1 b'ᵀ − Y‖² + α ‖W'‖²,

solved from the streamed moments (centered normal equations):
    (Cov(x̃) + α I) W' = Cov(x̃, y),    b' = E[y] − E[x̃]ᵀ W'.
α is relative: ``ridge`` × the mean diagonal of Cov(x̃). This is the step that keeps a model's
accuracy without fine-tuning (ThiNet, He et al. 2017 channel pruning, and the PFA notes).

Layer ↔ matrix layouts:
- Conv, group 1: W[o, c, k1, k2..] ↔ M[(c, k1, k2..), o] (matches ``stats.conv_patches``);
- Gemm: B (transB=1: d_out × d_in; else d_in × d_out), bias C broadcast on the last axis;
- MatMul with a constant 2-D right operand B (d_in × d_out); a following Add of a constant vector
  is treated as the bias by the passes that need it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_graphsurgeon as gs

from .graph import fresh_name, set_constant_input
from .stats import CrossMoments, LayerStats


def ridge_solve(cm: CrossMoments, ridge: float = 1e-4, fit_bias: bool = True):
    """W (d_in × d_out), b (d_out) minimising the ridge least-squares error."""
    mx, my = cm.x.mean, cm.mean_y
    if fit_bias:
        cxx = cm.x.cov
        cxy = cm.xy / max(cm.n, 1) - np.outer(mx, my)
    else:
        cxx = cm.x.second
        cxy = cm.xy / max(cm.n, 1)
    return ridge_from_moments(cxx, cxy, mx, my, ridge, fit_bias)


def ridge_from_moments(cxx, cxy, mx, my, ridge: float = 1e-4, fit_bias: bool = True):
    """W, b from moments (cxx, cxy centered when fit_bias, second moments otherwise);
    α = ridge × the mean diagonal of cxx."""
    d = cxx.shape[0]
    alpha = ridge * max(float(np.trace(cxx)) / max(d, 1), 1e-12)
    a = cxx + alpha * np.eye(d)
    try:
        w = np.linalg.solve(a, cxy)
    except np.linalg.LinAlgError:
        w = np.linalg.lstsq(a, cxy, rcond=None)[0]
    b = my - mx @ w if fit_bias else np.zeros(cxy.shape[1])
    return w, b


def fit_error(cm: CrossMoments, w: np.ndarray, b: np.ndarray) -> float:
    """Relative squared error Σ‖xW + b − y‖² / Σ‖y − ȳ‖² on the calibration moments."""
    n = max(cm.n, 1)
    exx = cm.x.second
    exy = cm.xy / n
    mx, my = cm.x.mean, cm.mean_y
    eyy = cm.yy / n
    # E‖xW + b − y‖² per output column, summed
    pred2 = np.einsum("ij,ik,kj->j", w, exx, w) + 2 * b * (mx @ w) + b * b
    cross = np.einsum("ij,ij->j", w, exy) + b * my
    err = pred2 - 2 * cross + eyy
    var = eyy - my * my
    return float(max(err.sum(), 0.0) / max(var.sum(), 1e-12))


# ----------------------------------------------------------------------------- layouts
def conv_attrs(node: gs.Node, weight_shape) -> dict:
    nd = len(weight_shape) - 2
    pads = list(node.attrs.get("pads", [0] * (2 * nd)))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        raise ValueError(f"auto_pad={auto_pad} is not supported; re-export with explicit pads")
    return {
        "kernel_shape": list(node.attrs.get("kernel_shape", weight_shape[2:])),
        "strides": list(node.attrs.get("strides", [1] * nd)),
        "dilations": list(node.attrs.get("dilations", [1] * nd)),
        "pads": pads,
        "group": int(node.attrs.get("group", 1)),
    }


def layer_matrix(node: gs.Node):
    """(M d_in × d_out, bias d_out or None) of a Conv (group 1), Gemm or MatMul node."""
    w = node.inputs[1].values
    if node.op == "Conv":
        o = w.shape[0]
        m = w.reshape(o, -1).T
    elif node.op == "Gemm":
        m = w.T if node.attrs.get("transB", 0) else w
        alpha = node.attrs.get("alpha", 1.0)
        m = m * alpha if alpha != 1.0 else m
    elif node.op == "MatMul":
        m = w
    else:
        raise ValueError(node.op)
    bias = None
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        bias = node.inputs[2].values.astype(np.float64)
        if node.op == "Gemm":
            beta = node.attrs.get("beta", 1.0)
            bias = np.broadcast_to(bias.reshape(-1) * beta, (m.shape[1],)).copy()
    return m.astype(np.float64), bias


def set_layer_matrix(node: gs.Node, m: np.ndarray, bias: np.ndarray | None, in_shape_tail=None):
    """Write M (d_in × d_out) and bias back into the node's weight (and bias) inputs.

    Conv: ``in_shape_tail`` is the kernel spatial shape; the input channel count is derived.
    A new bias input is added to Conv/Gemm when a bias is given and the node had none; a weight or
    bias other nodes share is left to them (the node gets a new, uniquely named one).
    """
    dtype = node.inputs[1].values.dtype
    if node.op == "Conv":
        k = list(node.inputs[1].values.shape[2:]) if in_shape_tail is None else list(in_shape_tail)
        o = m.shape[1]
        w = m.T.reshape([o, -1] + k)
    elif node.op == "Gemm":
        w = m.T if node.attrs.get("transB", 0) else m
        node.attrs["alpha"] = 1.0
        node.attrs["beta"] = 1.0
    else:
        w = m
    set_constant_input(node, 1, w.astype(dtype))
    if bias is not None:
        if node.op == "MatMul":
            raise ValueError("MatMul has no bias input; add an Add node instead")
        set_constant_input(node, 2, bias.astype(dtype), base=node.name + "_bias")


def add_matmul_bias(graph: gs.Graph, node: gs.Node, b: np.ndarray) -> None:
    """Add ``b`` (d_out) to a MatMul's output, which has no bias input: into the constant of the Add
    that is its only consumer when that constant broadcasts along the last axis (a scalar, (d_out,),
    (1, …, d_out)), else through a new Add that takes over the output tensor."""
    out = node.outputs[0]
    users = list(out.outputs)
    if len(users) == 1 and users[0].op == "Add" and len(users[0].inputs) == 2 and out not in graph.outputs:
        add = users[0]
        j = 1 if add.inputs[0] is out else 0
        c = add.inputs[j]
        v = c.values if isinstance(c, gs.Constant) else None
        if v is not None and v.size in (1, len(b)) and all(s == 1 for s in v.shape[:-1]):
            new = v.astype(np.float64) + b.reshape([1] * max(v.ndim - 1, 0) + [-1])
            set_constant_input(add, j, new.astype(v.dtype), graph)
            return
    dtype = node.inputs[1].values.dtype
    pre = gs.Variable(fresh_name(graph, out.name + "_pre_bias"), dtype=out.dtype)
    node.outputs[0] = pre
    const = gs.Constant(fresh_name(graph, node.name + "_bias_value"), b.astype(dtype))
    graph.nodes.append(gs.Node("Add", name=node.name + "_bias", inputs=[pre, const], outputs=[out]))
    graph.toposort()


def layer_stats_request(node: gs.Node, key: str, x_tensor: str, y_tensor: str | None, positions: int = 32,
                        rows_per_batch: int = 0) -> LayerStats:
    """The LayerStats request that gathers the inputs (and target outputs) of a weight layer."""
    if node.op == "Conv":
        attrs = conv_attrs(node, node.inputs[1].values.shape)
        if attrs["group"] != 1:
            raise ValueError("grouped Conv: refit per group is not supported by this helper")
        return LayerStats(key, x_tensor, y_tensor, kind="conv", conv_attrs=attrs, positions=positions)
    if node.op == "Gemm":
        return LayerStats(key, x_tensor, y_tensor, kind="linear", transpose_x=bool(node.attrs.get("transA", 0)),
                          rows_per_batch=rows_per_batch)
    if node.op == "MatMul":
        return LayerStats(key, x_tensor, y_tensor, kind="linear", rows_per_batch=rows_per_batch)
    raise ValueError(f"no layer statistics for op {node.op}")


def refit_order(graph: gs.Graph, names) -> list[list[str]]:
    """Group nodes to refit into levels: a node's level is 1 + the highest level of a refit node
    upstream of it. Nodes in one level do not feed each other, so one calibration run serves them
    all; levels are refit in order (sequential reconstruction)."""
    names = set(names)
    level = {}
    upstream_level = {}  # tensor name -> max level of refit nodes upstream
    for node in graph.nodes:  # graph must be toposorted
        lv_in = max([upstream_level.get(t.name, -1) for t in node.inputs if not isinstance(t, gs.Constant)] + [-1])
        if node.name in names:
            level[node.name] = lv_in + 1
            lv_out = lv_in + 1
        else:
            lv_out = lv_in
        for t in node.outputs:
            upstream_level[t.name] = lv_out
    groups = {}
    for n, lv in level.items():
        groups.setdefault(lv, []).append(n)
    return [sorted(groups[k]) for k in sorted(groups)]


def shared_levels(graph: gs.Graph, groups: dict) -> list[list[str]]:
    """``refit_order`` for layers that may span several nodes (a weight shared by several readers):
    ``groups`` maps a layer key to its nodes' names; a layer's level is that of its earliest reader
    (its statistics are gathered with the weight itself still as it was), levels renumbered 0, 1, …"""
    order = refit_order(graph, [n for names in groups.values() for n in names])
    level_of = {n: i for i, names in enumerate(order) for n in names}
    first = {key: min(level_of[n] for n in names) for key, names in groups.items()}
    out = {}
    for key, lv in first.items():
        out.setdefault(lv, []).append(key)
    return [sorted(out[k]) for k in sorted(out)]


@contextlib.contextmanager
def deterministic():
    """Run the block with one BLAS thread: k-means and code assignments compare float sums, and a
    BLAS that splits a product differently with more threads could round them differently and flip
    an argmin; the result must not depend on OMP/OPENBLAS/MKL_NUM_THREADS."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
