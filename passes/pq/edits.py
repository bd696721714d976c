"""pq's graph edits: the decode subgraph that rebuilds a weight from its codes, and the biases
the refit writes.

Decode: Cast(int8 codes → int32) (+ 128 when K > 128) → Gather(codebook (Cast fp16 → the weight's
dtype)) → Reshape (→ Transpose) → the weight input of every reader. Packed 4-bit codes:
v = Cast(int32) + 128, hi = v / 16, lo = v − 16·hi, Concat(hi, lo) → the same Gather. All
standard ops on constants, which runtimes fold once at load time (see ``codec``). Nodes are built
with ``graph.Emitter`` under names derived from the weight's (``W.pq_codebook``, ``W.pq_idx``, …).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import Emitter
from .codec import code_offset, pack_codes, stored_codes
from .layer import Layer, own_bias, shared_bias


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

    em = Emitter(graph, dtype=wdtype)
    made = []

    def add(op, inputs, suffix, dtype, shape, **attrs):
        out = gs.Variable(em.name("", f"{base}.pq{suffix}"), dtype=dtype, shape=shape)
        made.append(out)
        return em.op(op, inputs, attrs, out=out, name=f"{base}.pq{suffix}_{op.lower()}")

    def const(suffix, value):
        return em.const(value, dtype=value.dtype, name=f"{base}.pq_{suffix}")

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
        out = add("Transpose", [flat], "", wdtype, shape, perm=[1, 0])
    else:
        out = add("Reshape", [gathered, const("shape", np.array(shape, dtype=np.int64))], "", wdtype, shape)
    for v in made[:-1]:  # the decode's inner tensors are written without type information (fewer bytes)
        v.dtype = None
    return out


def replace_weight(graph: gs.Graph, layer: Layer, codebook: np.ndarray, codes: np.ndarray, packed: bool) -> None:
    """Every reader of the layer's weight reads the decoded tensor instead."""
    decoded = decode(graph, layer, codebook, codes, packed)
    for n in layer.nodes:
        for i, t in enumerate(n.inputs):
            if t is layer.weight:
                n.inputs[i] = decoded


# ----------------------------------------------------------------------------- biases
def refit_biases(layer: Layer, t_hat, cm, per_node) -> None:
    """b = E[y] − E[x̃]ᵀŴ: once from the pooled statistics ``cm`` for a bias all readers share,
    else per reader from its own (``per_node``). Conv/Gemm: b is the whole bias of the output y;
    MatMul: y excludes its bias Add, so b is added to that Add's constant."""
    w = layer.alpha * t_hat.T
    shared = shared_bias(layer)
    if shared is not None:
        b = cm.mean_y - cm.x.mean @ w
        if layer.node.op == "Gemm":
            b = b / layer.node.attrs.get("beta", 1.0)
        new = gs.Constant(shared.name, b.astype(shared.values.dtype))
        for n in layer.nodes:
            n.inputs[2] = new
        return
    for n in layer.nodes:
        if not own_bias(layer, n):
            continue
        own = per_node.get(n.name, cm)
        b = own.mean_y - own.x.mean @ w
        if n.op == "MatMul":
            layer.reader(n).add_bias(b)
        else:
            layer.reader(n).set_bias(b, base=n.name + ".pq_bias")
