"""pfa, the graph side: which nodes read a group's channels and how (its consumers, their input
columns per channel, a residual Add after them), and writing a refit layer back.

Removing the channels themselves is ``onnxshrink.channels`` (``Analysis.prune``): every tensor of a
coupling group loses the same channels, and each consumer's input columns are sliced. The consumers
are then refit (``refit``); the ones in ``SLICE_ONLY`` are only sliced."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...reconstruct import add_matmul_bias, layer_stats_request, set_layer_matrix

SLICE_ONLY = ("ConvTranspose",)   # consumers whose input channels are sliced but not refit (no LayerStats)


def refit_consumers(nodes, names):
    """The consumers among ``names`` that are refit (the others are only sliced)."""
    return [c for c in names if c in nodes and nodes[c].op not in SLICE_ONLY]


def refit_reason(node: gs.Node) -> str | None:
    """Why ``node`` cannot be refit (e.g. a Conv with auto_pad), or None when it can."""
    try:
        layer_stats_request(node, node.name, node.inputs[0].name, node.outputs[0].name)
    except ValueError as e:
        return str(e)
    return None


def consumer_blocks(an, consumer: str, node: gs.Node) -> dict:
    """{group index: [input columns of ``consumer``'s LayerStats features fed by each channel]}."""
    comps = None
    for e in an.edits:
        if e.kind == "in" and e.node == consumer:
            comps = np.asarray(e.comps)
            break
    if comps is None:
        return {}
    kk = 1
    if node.op == "Conv":
        kk = int(np.prod(node.inputs[1].values.shape[2:]))
    cls = an.roots[comps]
    gids, idx = an.class_group[cls], an.class_index[cls]
    out = {}
    for g in np.unique(gids):
        size = an.groups[g].size
        cols = [[] for _ in range(size)]
        for p in np.nonzero(gids == g)[0]:
            cols[idx[p]].extend(range(p * kk, (p + 1) * kk))
        out[int(g)] = [np.asarray(c, dtype=np.int64) for c in cols]
    return out


def weight_row_norms(node: gs.Node) -> np.ndarray:
    """Squared L2 norm of each output channel's weights."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Conv":
        return (w.reshape(w.shape[0], -1) ** 2).sum(axis=1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return (w ** 2).sum(axis=1)
    return (w ** 2).sum(axis=0)


def residual_target(node: gs.Node):
    """(sum tensor, skip tensor, bias constant) when the layer's output (through a MatMul's bias
    Add) goes only into an Add with another computed tensor, else None."""
    t, shift = node.outputs[0], None
    users = list(t.outputs)
    if node.op == "MatMul" and len(users) == 1 and users[0].op == "Add":
        c = [i for i in users[0].inputs if i is not t]
        if len(c) == 1 and isinstance(c[0], gs.Constant) and c[0].values.ndim >= 1:
            shift, t = c[0].values.reshape(-1).astype(np.float64), users[0].outputs[0]
            users = list(t.outputs)
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None
    other = [i for i in users[0].inputs if i is not t]
    if len(other) != 1 or isinstance(other[0], gs.Constant):
        return None
    return users[0].outputs[0].name, other[0].name, shift


def write_layer(graph: gs.Graph, node: gs.Node, w: np.ndarray, b: np.ndarray) -> None:
    """Write a refit W (d_in × d_out) and bias b into ``node`` (a MatMul's bias into its Add)."""
    if node.op == "MatMul":
        set_layer_matrix(node, w, None)
        add_matmul_bias(graph, node, b)
    else:
        set_layer_matrix(node, w, b)
