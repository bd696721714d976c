"""Bytes: what a layer costs dense and as codes + codebook, measured on the protos the export
writes (so that size budgets are exact, but for the digits of the decode's tag: a few bytes a
layer), and the float weight bytes of a graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import export_model
from .codec import WORDS
from .edits import decode
from .layer import Layer, own_bias, shared_bias


def weight_bytes(graph: gs.Graph, skip: tuple = ()) -> int:
    """Bytes of the float constants of the graph (``skip``: leave out those whose name holds one of these)."""
    return int(sum(t.values.nbytes for t in graph.tensors().values()
                   if isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating)
                   and not any(s in t.name for s in skip)))


def element_bytes(proto) -> int:
    """Serialized bytes of one element of a repeated GraphProto field (tag, length, message)."""
    n = proto.ByteSize()
    return 1 + _varint_len(n) + n


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def tensor_bytes(name: str, values: np.ndarray) -> int:
    """Serialized bytes of ``values`` stored as the initializer ``name``."""
    return element_bytes(onnx.numpy_helper.from_array(np.ascontiguousarray(values), name))


def dense_bytes(layer: Layer) -> int:
    """Serialized bytes of the layer's weight as it is."""
    return tensor_bytes(layer.weight.name, layer.weight.values)


def code_width(layer: Layer, d: int, k: int, dtype, cfg) -> int:
    """The bits a code is stored in: 4 (two a byte, K ≤ 16), 5 (six in four bytes, K ≤ 32), 6 (four
    in three bytes, K ≤ 64) or 8. ``pq.bits`` 4/5/6/8: that width where K fits in it, else the next
    wider; auto: of the widths K
    fits in, the one whose codes and decode take the fewest bytes (tiny layers: the extra decode
    nodes of packed codes cost more than they save)."""
    n = layer.n_weights // d
    fits = [b for b in (4, 5, 6) if k <= 1 << b and (b not in WORDS or n > 2 * WORDS[b][0] + 1)]
    if cfg.bits != "auto":
        return next((b for b in fits if b >= int(cfg.bits)), 8)
    if not fits:
        return 8
    refit = layer.aware and cfg.bias_correct
    return min(fits + [8], key=lambda b: (pq_bytes(layer, d, k, dtype, refit, b), -b))


def pq_bytes(layer: Layer, d: int, k: int, dtype, bias_refit: bool, bits: int = 8) -> int:
    """Serialized bytes of the layer's weight stored as k centroids of length d: the decode
    nodes, their initializers and type information, and the bias where the refit adds or widens
    one, measured on the protos the export writes, so that size budgets are exact (the scratch
    graph's decode is tagged ``pq0``; in a model with more decodes the tag has more digits).
    Kept on the layer per (d, k, dtype, bias_refit, bits): the ladder, the code width and the
    fit ask again for the same ones (each a scratch export of the codes' size); ``forget_bytes``
    drops them (a bias another layer's rewrite has since given its own copy counts otherwise)."""
    memo = layer.__dict__.setdefault("_pq_bytes", {})
    key = (d, k, np.dtype(dtype).str, bool(bias_refit), bits)
    if key not in memo:
        memo[key] = _pq_bytes(layer, d, k, dtype, bias_refit, bits)
    return memo[key]


def forget_bytes(layer) -> None:
    """Drop the byte counts ``pq_bytes`` kept on the layer."""
    layer.__dict__.pop("_pq_bytes", None)


def _pq_bytes(layer: Layer, d: int, k: int, dtype, bias_refit: bool, bits: int) -> int:
    rows = layer.matrix().shape[0]
    scratch = gs.Graph(opset=_opset(layer) or 13)
    out = decode(scratch, layer, np.zeros((k, d), dtype), np.zeros((rows, layer.d_in // d), np.uint8), bits)
    probe = gs.Variable("probe", dtype=out.dtype)  # a consumer, so the weight is typed like in the model
    scratch.nodes.append(gs.Node("Identity", name="probe", inputs=[out], outputs=[probe]))
    scratch.outputs = [probe]
    g = export_model(scratch).graph
    nodes = [n for n in g.node if n.name != "probe"]
    pq = sum(element_bytes(p) for p in (*nodes, *g.initializer, *g.value_info))
    if bias_refit:
        shared = shared_bias(layer)
        for node in ([] if shared is not None else layer.nodes):
            if node.op not in ("Conv", "Gemm") or not own_bias(layer, node):
                continue
            if len(node.inputs) > 2:
                bias = node.inputs[2]
                if len(bias.outputs) > 1:  # a bias other nodes share: this node gets its own copy
                    pq += tensor_bytes(node.name + ".pq_bias", np.zeros(rows, bias.values.dtype))
                    continue
                new = tensor_bytes(bias.name, np.zeros(rows, bias.values.dtype))
                old = tensor_bytes(bias.name, bias.values)
            else:
                new, old = tensor_bytes(node.name + ".pq_bias", np.zeros(rows, layer.weight.values.dtype)), 0
            pq += max(new - old, 0)
    return pq


def setting_bytes(layer: Layer, d: int, k: int, cfg) -> int:
    """Bytes of the layer stored with sub-vectors of length d and k centroids, in the code width
    ``code_width`` gives."""
    dtype = cfg.dtype
    return pq_bytes(layer, d, k, dtype, layer.aware and cfg.bias_correct, code_width(layer, d, k, dtype, cfg))


def _opset(layer: Layer):
    """The opset of the graph the layer is in (the decode's ReduceSum depends on it), when known."""
    graph = getattr(getattr(layer, "layer", None), "graph", None)
    return getattr(graph, "opset", None)
