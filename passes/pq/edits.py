"""pq's graph edits: the decode subgraph that rebuilds a weight from its codes, and the biases
the refit writes.

Decode: Cast(int8 codes → int32) (+ 128 when K > 128) → Gather(codebook (Cast fp16 → the weight's
dtype)) → Reshape (→ Transpose) → the weight input of every reader. Packed 4-bit codes:
v = Cast(int32) + 128, hi = v / 16, lo = v − 16·hi, Concat(hi, lo) → the same Gather. All
standard ops on constants, which runtimes fold once at load time (see ``codec``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .codec import code_offset, pack_codes, stored_codes
from .layer import Layer, bias_target, shared_bias


def decode(graph: gs.Graph, layer: Layer, codebook: np.ndarray, codes: np.ndarray,
           packed: bool = False) -> gs.Variable:
    """Cast(int8 codes → int32) (→ Add offset) → Gather(codebook (→ Cast)) → Reshape
    (→ Transpose): the weight tensor, from ops and types TensorRT's ONNX parser accepts.
    Packed 4-bit codes: v = Cast(int32) + 128, hi = v / 16 (integer division, floor as v ≥ 0),
    lo = v − 16·hi, Concat(hi, lo) (→ Slice to n when n is odd) → the same Gather."""
    base = layer.weight.name
    wdtype = layer.weight.values.dtype
    k, d = codebook.shape
    rows, nb = codes.shape
    n = rows * nb

    def add(op, inputs, suffix, dtype, shape, **attrs):
        out = gs.Variable(f"{base}.pq{suffix}", dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node(op, name=f"{base}.pq{suffix}_{op.lower()}", attrs=attrs,
                                   inputs=inputs, outputs=[out]))
        return out

    def const(suffix, value):
        return gs.Constant(base + ".pq_" + suffix, np.ascontiguousarray(value))

    cb = const("codebook", codebook)
    if packed:
        if k > 16:
            raise ValueError(f"4-bit codes hold at most 16 centroids, got {k}")
        h = (n + 1) // 2
        raw = add("Cast", [const("codes", pack_codes(codes))], "_packed", np.int32, [h],
                  to=onnx.TensorProto.INT32)
        sixteen = const("sixteen", np.array(16, dtype=np.int32))
        v = add("Add", [raw, const("offset", np.array(128, dtype=np.int32))], "_byte", np.int32, [h])
        hi = add("Div", [v, sixteen], "_hi", np.int32, [h])
        lo = add("Sub", [v, add("Mul", [hi, sixteen], "_hi16", np.int32, [h])], "_lo", np.int32, [h])
        idx = add("Concat", [hi, lo], "_nibbles", np.int32, [2 * h], axis=0)
        if 2 * h != n:
            idx = add("Slice", [idx, const("start", np.array([0], dtype=np.int64)),
                                const("end", np.array([n], dtype=np.int64))], "_index", np.int32, [n])
        gather_shape = [n, d]
    else:
        cd = const("codes", stored_codes(codes, k))
        idx = add("Cast", [cd], "_idx", np.int32, [rows, nb], to=onnx.TensorProto.INT32)
        if code_offset(k):
            idx = add("Add", [idx, const("offset", np.array(code_offset(k), dtype=np.int32))],
                      "_index", np.int32, [rows, nb])
        gather_shape = [rows, nb, d]
    table = cb
    if codebook.dtype != wdtype:
        table = add("Cast", [cb], "_codebook_f", wdtype, [k, d],
                    to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(wdtype)))
    gathered = add("Gather", [table, idx], "_gathered", wdtype, gather_shape, axis=0)
    shape = list(layer.shape)
    if layer.rows_of == "transpose":
        flat_shape = const("shape", np.array([rows, nb * d], dtype=np.int64))
        flat = add("Reshape", [gathered, flat_shape], "_rows", wdtype, [rows, nb * d])
        return add("Transpose", [flat], "", wdtype, shape, perm=[1, 0])
    return add("Reshape", [gathered, const("shape", np.array(shape, dtype=np.int64))], "", wdtype, shape)


def replace_weight(graph: gs.Graph, layer: Layer, codebook: np.ndarray, codes: np.ndarray, packed: bool) -> None:
    """Every reader of the layer's weight reads the decoded tensor instead."""
    decoded = decode(graph, layer, codebook, codes, packed)
    for n in layer.nodes:
        n.inputs[1] = decoded


# ----------------------------------------------------------------------------- biases
def _write_bias(layer: Layer, node: gs.Node, target, b_new: np.ndarray):
    """Conv/Gemm: b_new is the whole bias of the output y; MatMul + Add: y excludes the Add's
    constant, so b_new is added to it."""
    dtype = layer.weight.values.dtype
    if target[0] == "add":
        _, add, i = target
        c = add.inputs[i]
        add.inputs[i] = gs.Constant(c.name, (c.values.astype(np.float64) + b_new).astype(c.values.dtype))
        return
    if node.op == "Gemm":
        b_new = b_new / node.attrs.get("beta", 1.0)
    if len(node.inputs) > 2:
        c = node.inputs[2]
        name = c.name if len(c.outputs) == 1 else node.name + ".pq_bias"  # a shared bias stays as it is
        node.inputs[2] = gs.Constant(name, b_new.astype(c.values.dtype))
    else:
        node.inputs.append(gs.Constant(node.name + ".pq_bias", b_new.astype(dtype)))


def _write_shared_bias(layer: Layer, bias: gs.Constant, b_new: np.ndarray):
    if layer.node.op == "Gemm":
        b_new = b_new / layer.node.attrs.get("beta", 1.0)
    new = gs.Constant(bias.name, b_new.astype(bias.values.dtype))
    for n in layer.nodes:
        n.inputs[2] = new


def refit_biases(layer: Layer, t_hat, cm, per_node) -> None:
    """b = E[y] − E[x̃]ᵀŴ: once from the pooled statistics ``cm`` for a bias all readers share,
    else per reader from its own (``per_node``)."""
    w = layer.alpha * t_hat.T
    shared = shared_bias(layer)
    if shared is not None:
        _write_shared_bias(layer, shared, cm.mean_y - cm.x.mean @ w)
        return
    for n in layer.nodes:
        target = bias_target(layer, n)
        own = per_node.get(n.name, cm)
        if target is not None:
            _write_bias(layer, n, target, own.mean_y - own.x.mean @ w)
