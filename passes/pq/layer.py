"""The weight layers pq quantizes, as pq sees them: T (rows × d_in), row r the weights of output r.

Conv/ConvTranspose: T = W.reshape(rows, −1) (a sub-vector of length k·k is one kernel); Gemm
with transB=1: T = B; Gemm with transB=0 and MatMul: T = Bᵀ. A weight several nodes read (an
unrolled RNN's time steps, tied matrices) is one layer over all its readers, quantized once.
The bias a refit can write: Conv/Gemm input 2, or the constant vector of the Add that is a
MatMul's only consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...reconstruct import conv_attrs


@dataclass
class Layer:
    """A weight layer seen as T (rows × d_in): row r holds the weights of output r (per group).
    ``nodes``: every node that reads the weight (several when the weight is shared: an unrolled
    RNN's time steps, tied matrices); the weight is quantized once and they all read the one
    decoded tensor."""

    nodes: list
    weight: gs.Constant
    rows_of: str          # "natural" (T = W.reshape(rows, -1)) or "transpose" (T = W.T)
    aware: bool           # LayerStats can give the input covariance (group-1 Conv, Gemm, MatMul)
    kernel: int           # k·k of a Conv/ConvTranspose kernel, 1 otherwise

    @property
    def node(self) -> gs.Node:
        return self.nodes[0]

    @property
    def shape(self):
        return tuple(self.weight.values.shape)

    def matrix(self) -> np.ndarray:
        w = self.weight.values
        if self.rows_of == "transpose":
            return w.T
        return w.reshape(w.shape[0], -1)

    @property
    def d_in(self):
        return self.matrix().shape[1]

    @property
    def n_weights(self):
        return int(np.prod(self.shape))

    @property
    def alpha(self) -> float:
        """Gemm's alpha (the product the layer computes is alpha · x W), 1 otherwise."""
        return float(self.node.attrs.get("alpha", 1.0)) if self.node.op == "Gemm" else 1.0


def layer_of(node: gs.Node, graph_outputs) -> tuple[Layer | None, str | None]:
    """(the node's layer, None), or (None, why it cannot be quantized), or (None, None) for a
    node that is not a weight layer."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None, None
    if len(node.inputs) < 2:
        return None, "no weight input"
    w = node.inputs[1]
    if not isinstance(w, gs.Constant):
        if node.op == "MatMul":
            return None, "MatMul whose right operand is computed at run time (no constant weight)"
        return None, "weights are not constants"
    if not np.issubdtype(w.values.dtype, np.floating):
        return None, f"weights of dtype {w.values.dtype}, not float"
    if w.name in graph_outputs:
        return None, "weights are a graph output"
    if any(t is w for i, t in enumerate(node.inputs) if i != 1):
        return None, "the weight is also another input of the node"
    shape = w.values.shape
    if node.op == "MatMul":
        if len(shape) != 2:
            return None, f"MatMul weight of rank {len(shape)} (only 2-D right operands)"
        return Layer([node], w, "transpose", True, 1), None
    if node.op == "Gemm":
        if len(shape) != 2:
            return None, "Gemm weight is not 2-D"
        trans = bool(node.attrs.get("transB", 0))
        return Layer([node], w, "natural" if trans else "transpose", True, 1), None
    kernel = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if node.op == "Conv":
        try:
            attrs = conv_attrs(node, shape)
        except ValueError as e:
            return None, str(e)
        return Layer([node], w, "natural", attrs["group"] == 1, kernel), None
    return Layer([node], w, "natural", False, kernel), None  # ConvTranspose: weight space


def shared_layer(layer: Layer, graph_outputs) -> tuple[Layer | None, str | None]:
    """The layer of a weight several nodes read: one Layer over all of them when every reader is a
    weight layer of the same kind and layout (the same matrix view, so their input statistics
    pool), else None and why."""
    readers = list(layer.weight.outputs)
    nodes = []
    for n in readers:
        other, reason = layer_of(n, graph_outputs)
        if other is None:
            return None, (f"weights shared by {len(readers)} nodes, one of them {n.name} ({n.op}) "
                          f"{'is not a weight layer' if reason is None else 'cannot be rewritten: ' + reason}")
        if (n.op, other.rows_of, other.aware) != (layer.node.op, layer.rows_of, layer.aware) or \
                (n.op == "Gemm" and n.attrs.get("alpha", 1.0) != layer.node.attrs.get("alpha", 1.0)):
            return None, (f"weights shared by {len(readers)} nodes of different kinds or layouts "
                          f"({layer.node.name} {layer.node.op}, {n.name} {n.op})")
        nodes.append(n)
    return Layer(nodes, layer.weight, layer.rows_of, layer.aware, layer.kernel), None


# ----------------------------------------------------------------------------- sub-vector lengths
def default_block(layer: Layer, cfg) -> int:
    """The sub-vector length d: ``pq.block``, else a Conv kernel of up to 16 taps, else 4, 8 or 2
    (the first that divides d_in), else 1."""
    d_in = layer.d_in
    if cfg.block:
        return cfg.block
    # a kernel of up to 16 taps is one sub-vector; a longer one (a 1-D filter bank, an STFT as
    # Conv) is cut like a dense row: a 512-long sub-vector would need as many centroids as rows
    if layer.kernel > 1 and (layer.kernel <= 16 or int(layer.shape[-1]) <= 16):
        return layer.kernel if layer.kernel <= 16 else int(layer.shape[-1])
    for d in (4, 8, 2):
        if d_in % d == 0:
            return d
    return 1


def ladder(layer: Layer, d: int) -> list:
    """Sub-vector lengths tried in turn under pq.max_error: the default d, then shorter ones (a
    Conv kernel row or half the length, 2), down to 1 (scalar codes, 8 bits a weight)."""
    out = [d]
    if layer.kernel > 1 and d == layer.kernel and 1 < int(layer.shape[-1]) < d:
        out.append(int(layer.shape[-1]))
    elif d > 2 and layer.d_in % (d // 2) == 0:
        out.append(d // 2)
    if out[-1] > 2 and layer.d_in % 2 == 0:
        out.append(2)  # 4 bits a weight with 256 centroids
    if out[-1] > 1:
        out.append(1)
    return out


def candidates(layer: Layer, cfg) -> list:
    """(d, K) settings tried by the size search."""
    if layer.kernel > 1 and layer.node.op == "Conv":
        ds = [layer.kernel, int(layer.shape[-1]), 2 * layer.kernel]
    else:
        ds = [2, 4, 8, 16]
    ds = sorted({d for d in ds if layer.d_in % d == 0})
    ks = {min(cfg.centroids, 32), cfg.centroids}
    if cfg.bits != "8":
        ks.add(min(cfg.centroids, 16))  # 4-bit codes: half the bytes of the codes
    if cfg.bits == "4":
        ks = {min(cfg.centroids, 16)}
    ks = sorted(ks)
    return [(d, min(k, layer.n_weights // d)) for d in ds for k in ks if layer.n_weights // d > k]


# ----------------------------------------------------------------------------- biases
def bias_target(layer: Layer, node: gs.Node):
    """(kind, tensor holder) where ``node``'s bias correction can go: ("input", node) for
    Conv/Gemm, ("add", add_node, const_index) for a MatMul followed by an Add of a constant vector."""
    n_out = layer.matrix().shape[0]
    if node.op == "Conv":
        if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
            return None
        return ("input", node)
    if node.op == "Gemm":
        if node.attrs.get("beta", 1.0) == 0:
            return None
        if len(node.inputs) > 2 and (not isinstance(node.inputs[2], gs.Constant)
                                     or node.inputs[2].values.size not in (1, n_out)
                                     or len(node.inputs[2].outputs) > 1):
            return None
        return ("input", node)
    if node.op == "MatMul":
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add":
            add = out.outputs[0]
            for i, t in enumerate(add.inputs):
                if (isinstance(t, gs.Constant) and t.values.shape == (n_out,) and len(t.outputs) == 1):
                    return ("add", add, i)
    return None


def shared_bias(layer: Layer):
    """The bias constant of a shared-weight layer when every reader of the weight reads that one
    bias (Conv/Gemm input 2, same Gemm beta) and nothing else reads it: it is refit once, from the
    pooled statistics. None otherwise (each reader's bias is refit on its own)."""
    if len(layer.nodes) < 2 or layer.node.op not in ("Conv", "Gemm"):
        return None
    n_out = layer.matrix().shape[0]
    first = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
    if not isinstance(first, gs.Constant) or first.values.size not in (1, n_out):
        return None
    beta = layer.node.attrs.get("beta", 1.0)
    if beta == 0 or any(len(n.inputs) < 3 or n.inputs[2] is not first or n.attrs.get("beta", 1.0) != beta
                        for n in layer.nodes):
        return None
    if {id(n) for n in first.outputs} != {id(n) for n in layer.nodes}:
        return None
    return first


def bias_fit(layer: Layer, cfg) -> bool:
    """Whether the layer's output shift can be absorbed into a bias (of some reader)."""
    if not cfg.bias_correct:
        return False
    return shared_bias(layer) is not None or any(bias_target(layer, n) is not None for n in layer.nodes)


def fixed_bias(layer: Layer, node: gs.Node):
    """The constant bias a Conv/Gemm adds to its product (d_out), or None."""
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return None
    n_out = layer.matrix().shape[0]
    b = node.inputs[2].values.astype(np.float64).reshape(-1)
    if b.size not in (1, n_out):
        return None
    if node.op == "Gemm":
        b = b * float(node.attrs.get("beta", 1.0))
    return np.broadcast_to(b, (n_out,)).copy()
