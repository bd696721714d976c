"""pfa, the graph side: which nodes read a group's channels and how (its consumers, whether they can
be refit, their input columns per channel, a residual Add after them); layers are read through
``layers.WeightLayer``.

Removing the channels themselves is ``onnxshrink.channels`` (``Analysis.prune``): every tensor of a
coupling group loses the same channels, and each consumer's input columns are sliced. The consumers
are then refit (``refit``), a ConvTranspose on the input pixels its taps map onto each output
position (``stats.conv_transpose_patches``); one whose pads are implicit (``auto_pad`` SAME_*,
``sliced_only``) is only sliced."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...layers import LAYER_OPS, WeightLayer, explicit_pads, not_shared
from ...registry import Skip

def sliced_only(node: gs.Node) -> bool:
    """A consumer whose input channels are sliced but not refit: a ConvTranspose without the explicit
    pads its statistics need (``auto_pad`` SAME_*, or an ``output_shape``: the pads follow the output
    size)."""
    if node.op != "ConvTranspose":
        return False
    if "output_shape" in node.attrs:
        return True
    try:
        WeightLayer(node).conv_attrs()
    except ValueError:
        return True
    return False


def refit_consumers(nodes, names):
    """The consumers among ``names`` that are refit (the others are only sliced: ``sliced_only``)."""
    return [c for c in names if c in nodes and not sliced_only(nodes[c])]


def single_group(layer: WeightLayer) -> str | None:
    """A grouped Conv's input columns are refit per group, which pfa does not do."""
    if layer.op in ("Conv", "ConvTranspose") and layer.group != 1:
        return f"grouped {layer.op}: refit per group is not supported by this helper"
    return None


REFIT_CHECKS = (explicit_pads, single_group)   # what a consumer must pass to be refit


def refit_reason(node: gs.Node, graph: gs.Graph | None = None) -> str | None:
    """Why ``node`` cannot be refit (e.g. a Conv with auto_pad), or None when it can."""
    layer = WeightLayer.of(node, graph, *REFIT_CHECKS)
    return layer.reason if isinstance(layer, Skip) else None


def downstream_layers(graph: gs.Graph, names, depth: int) -> list:
    """The weight layers within ``depth`` weight layers downstream of the nodes ``names`` (the refit
    consumers) that can be refit on their own (``REFIT_CHECKS``, weight not shared), not in ``names``.
    Their inputs change with the consumers' refits, so a refit toward the reference network's output
    corrects part of the error that reaches them (sequential reconstruction one layer further)."""
    names = set(names)
    nodes = [n for n in graph.nodes if n.name in names]
    seen, found = {}, []
    todo = [(n, 0) for n in nodes]
    while todo:
        node, d = todo.pop()
        for t in node.outputs:
            for user in t.outputs:
                du = d + 1 if user.op in LAYER_OPS else d
                if du > depth or seen.get(user.name, depth + 1) <= du:
                    continue
                seen[user.name] = du
                if user.op in LAYER_OPS and not sliced_only(user) and user.name not in names \
                        and user.name not in found:
                    layer = WeightLayer.of(user, graph, *REFIT_CHECKS, not_shared)
                    if not isinstance(layer, Skip):
                        found.append(user.name)
                todo.append((user, du))
    return sorted(found)


def consumer_blocks(an, consumer: str, node: gs.Node) -> dict:
    """{group index: [input columns of ``consumer``'s LayerStats features fed by each channel]}."""
    comps = None
    for e in an.edits:
        if e.kind == "in" and e.node == consumer:
            comps = np.asarray(e.comps)
            break
    if comps is None:
        return {}
    kk = int(np.prod(WeightLayer(node).kernel))   # a Conv's input channel is k·k columns, else one
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
    """Squared L2 norm of each output channel's weights (the columns of the layer's matrix)."""
    return (WeightLayer(node).matrix() ** 2).sum(axis=0)


def residual_target(layer: WeightLayer):
    """(sum tensor, skip tensor, bias) when the layer's output (through a MatMul's bias Add,
    ``WeightLayer.bias_add``, whose constant is then the bias) goes only into an Add with another
    computed tensor, else None."""
    t, shift = layer.node.outputs[0], None
    add = layer.bias_add
    if add is not None:
        shift, t = layer.bias(), add.outputs[0]
    found = _sole_add(t)
    if found is None:
        return None
    return found[0].outputs[0].name, found[1].name, shift


def _sole_add(t):
    """(the Add, its other input) when tensor ``t`` goes only into an Add with another computed
    tensor, else None."""
    users = list(t.outputs)
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None
    other = [i for i in users[0].inputs if i is not t]
    if len(other) != 1 or isinstance(other[0], gs.Constant):
        return None
    return users[0], other[0]


def block_output(layer: WeightLayer):
    """(sum tensor, scale) when a MatMul/Gemm layer's output (through its bias Add) goes, possibly
    scaled by a constant Mul (a transformer's layer scale: a scalar or one value per output column),
    only into an Add with another computed tensor that the layer's input was computed from (the
    residual stream): what its output error reaches is ``scale ⊙ error`` in that sum. None
    otherwise (two branches summed, and Conv layers)."""
    if layer.op not in ("MatMul", "Gemm"):
        return None
    t = layer.node.outputs[0]
    if layer.bias_add is not None:
        t = layer.bias_add.outputs[0]
    scale = np.ones(layer.d_out)
    users = list(t.outputs)
    if len(users) == 1 and users[0].op == "Mul" and len(users[0].inputs) == 2:
        const = [i for i in users[0].inputs if isinstance(i, gs.Constant)]
        if len(const) != 1 or const[0].values.size not in (1, layer.d_out) or \
                (const[0].values.size > 1 and const[0].values.shape[-1] != layer.d_out):
            return None
        scale = scale * np.asarray(const[0].values, dtype=np.float64).reshape(-1)
        t = users[0].outputs[0]
    found = _sole_add(t)
    if found is None or not _upstream(layer.node.inputs[0], found[1]):
        return None   # two branches summed, not a block on a residual stream
    return found[0].outputs[0].name, scale


def _upstream(t, skip, limit: int = 400) -> bool:
    """True when tensor ``skip`` is among the producers' inputs back from ``t`` (a residual stream:
    the block read it, through its norm, before adding to it), looking at most ``limit`` tensors."""
    seen, todo = set(), [t]
    while todo and len(seen) < limit:
        cur = todo.pop()
        if cur is skip:
            return True
        if cur.name in seen:
            continue
        seen.add(cur.name)
        for p in cur.inputs:
            todo.extend(i for i in p.inputs if not isinstance(i, gs.Constant))
    return False
