"""In-graph Walsh–Hadamard transform and Fastfood blocks, built from standard ONNX ops.

The Sylvester Hadamard matrix factorises as a Kronecker product, H_d = H_a ⊗ H_b (d = a·b, both
powers of two). For a vector z of length d read as a row-major matrix Z (a × b),
H_d z = vec(H_a Z H_b), so the transform is two small constant MatMuls (b × b and a × a) with a
Transpose of the last two axes between them: no d × d matrix is ever stored. Skipping the final
Transpose leaves the result in transposed layout; a following Gather (the Fastfood permutation Π)
absorbs that re-ordering for free, so a Fastfood block V = S H G Π H B costs

    Mul(B) → Reshape → MatMul(H_b) → Transpose → MatMul(H_a) → Reshape → Gather(Π) → Mul(G)
           → Reshape → MatMul(H_a) → Transpose → MatMul(H_b) → Mul(S)

with all M = stacks × blocks blocks of a layer batched along one extra axis (Deep Fried Convnets,
Yang et al. 2015; Fastfood, Le et al. 2013). Every op is one that ONNX Runtime and TensorRT's ONNX
parser handle: Pad, Reshape, Mul, MatMul, Transpose, Gather, ReduceSum, Slice, Add.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from scipy.linalg import hadamard

from ...graph import Emitter
from .transform import factors, next_pow2


def transposed_position(d: int) -> np.ndarray:
    """tp[i]: where natural index i = ia·b + ib sits in the transposed layout (ib·a + ia)."""
    a, b = factors(d)
    i = np.arange(d)
    return (i % b) * a + i // b


def natural_index(d: int) -> np.ndarray:
    """nat[q]: the natural index held at transposed-layout position q (inverse of tp)."""
    return np.argsort(transposed_position(d))


class HadamardEmitter(Emitter):
    """``graph.Emitter`` with the Hadamard factors: one constant per size and dtype, shared by the
    layers of a pass through ``shared``."""

    def hmat(self, n):
        dt = np.dtype(self.dtype)
        return self.shared_const(("H", n, dt.str), lambda: hadamard(n).astype(self.dtype), f"hadamard/H{n}_{dt.name}")

    def hadamard_2d(self, x, lead: int, d: int, first: str, transposed_out: bool):
        """x: (*lead dims, d) flattened as (…, d). Applies H_d (unnormalised) along the last axis.

        ``first="natural"``: x is in natural layout; ``"transposed"``: x holds the transposed
        layout (b × a). The result is in natural layout, or transposed when ``transposed_out``
        (saving a Transpose when a Gather follows). Returns (y, layout)."""
        a, b = factors(d)
        zeros = [0] * lead
        if a == 1:  # d ≤ 2: one factor
            y = self.op("MatMul", [x, self.hmat(d)])
            return y, first
        rank = lead + 2
        if first == "natural":
            z = self.reshape(x, zeros + [a, b])
            z = self.op("MatMul", [z, self.hmat(b)])          # Z H_b
            z = self.swap_last(z, rank)                         # (Z H_b)ᵀ
            z = self.op("MatMul", [z, self.hmat(a)])          # (H_a Z H_b)ᵀ
            layout = "transposed"
        else:
            z = self.reshape(x, zeros + [b, a])                 # Zᵀ
            z = self.op("MatMul", [z, self.hmat(a)])          # (H_a Z)ᵀ
            z = self.swap_last(z, rank)                         # H_a Z
            z = self.op("MatMul", [z, self.hmat(b)])          # H_a Z H_b
            layout = "natural"
        if layout == "transposed" and not transposed_out:
            z = self.swap_last(z, rank)
            layout = "natural"
        return self.reshape(z, zeros + [d]), layout


def wht_model(d_in: int, opset: int = 17, dtype=np.float32) -> onnx.ModelProto:
    """A standalone model x (N, d_in) → H_d pad(x) (N, d), d = next power of two (for tests)."""
    d = next_pow2(d_in)
    x = gs.Variable("x", dtype=dtype, shape=["N", d_in])
    graph = gs.Graph(inputs=[x], opset=opset)
    em = HadamardEmitter(graph, "wht", dtype=dtype, opset=opset)
    h = em.pad_last(x, 2, d - d_in) if d > d_in else x
    y, _ = em.hadamard_2d(h, 1, d, "natural", transposed_out=False)
    y.name, y.shape = "y", ["N", d]
    graph.outputs = [y]
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = min(model.ir_version, 10)
    return model


def emit_fastfood(em: HadamardEmitter, x: gs.Variable, rank: int, d_in: int, d_out: int, ff, lowrank=None,
                  bias=None, out: gs.Variable | None = None):
    """Emit y = Σ_k Fastfood_{j,k}(pad(x)) stacked over j, sliced to d_out, + x U Vᵀ + bias.

    ``ff``: dict with b, g, s of shape (n_stack, K, d) (orthonormal-H convention: each H is
    H_d/√d) and perms (n_stack, K, d) (Π z = z[perm]); ``lowrank``: (U d_in×r, Vt r×d_out) or None.
    x has ``rank`` axes, the last being d_in. Returns the output variable."""
    b, g, s, perms = ff["b"], ff["g"], ff["s"], ff["perms"]
    n_stack, K, d = b.shape
    M = n_stack * K
    lead = rank - 1
    zeros = [0] * lead
    h = em.pad_last(x, rank, d - d_in) if d > d_in else x
    h = em.reshape(h, zeros + [1, d])                                  # (…, 1, d)
    h = em.op("Mul", [h, em.const(b.reshape(M, d), "B")])                # (…, M, d)
    h, layout = em.hadamard_2d(h, lead + 1, d, "natural", transposed_out=True)
    # Gather: position q of the second transform's input (transposed layout when two factors)
    a_, _ = factors(d)
    two = a_ > 1
    nat = natural_index(d) if two else np.arange(d)
    tp_in = transposed_position(d) if (two and layout == "transposed") else np.arange(d)
    idx = np.empty((M, d), dtype=np.int64)
    gl = np.empty((M, d))
    for m in range(M):
        perm = perms.reshape(M, d)[m]
        idx[m] = m * d + tp_in[perm[nat]]
        gl[m] = g.reshape(M, d)[m][nat] / d            # both 1/√d scalings folded into G
    h = em.reshape(h, zeros + [M * d])
    h = em.op("Gather", [h, em.const(idx.reshape(-1), "perm", dtype=np.int32)], {"axis": lead})
    h = em.reshape(h, zeros + [M, d])
    h = em.op("Mul", [h, em.const(gl, "G")])
    h, layout = em.hadamard_2d(h, lead + 1, d, "transposed" if two else "natural", transposed_out=False)
    h = em.op("Mul", [h, em.const(s.reshape(M, d), "S")])                # (…, M, d)
    if K > 1:
        h = em.reshape(h, zeros + [n_stack, K, d])
        h = em.reduce_sum(h, lead + 1)                                   # (…, n_stack, d)
    h = em.reshape(h, zeros + [n_stack * d])
    if n_stack * d != d_out:
        h = em.slice_last(h, d_out)
    if lowrank is not None and lowrank[0].shape[1] > 0:
        u, vt = lowrank
        z = em.op("MatMul", [x, em.const(u, "U")])
        z = em.op("MatMul", [z, em.const(vt, "V")])
        h = em.op("Add", [h, z])
    if bias is not None:
        h = em.op("Add", [h, em.const(bias, "bias")], out=out)
    elif out is not None:
        h = em.op("Identity", [h], out=out)
    return h


def input_rank(node: gs.Node) -> int | None:
    """The rank of a layer's input, or None when shape inference does not know it."""
    shape = node.inputs[0].shape
    return len(shape) if shape is not None else None


def replace(graph: gs.Graph, node: gs.Node, fit, shared: dict, op_set: int) -> None:
    """Replace the Gemm/MatMul ``node`` by the Fastfood subgraph of ``fit`` (a ``FastfoodFit``),
    writing the same output tensor; ``shared`` holds the Hadamard factors already in the graph."""
    ff, lowrank, bias = fit.graph_params()
    dtype = node.inputs[1].values.dtype
    y = node.outputs[0]
    x = node.inputs[0]
    rank = input_rank(node)
    em = HadamardEmitter(graph, node.name + "/fastfood", shared, dtype=dtype, opset=op_set)
    lr = (lowrank[0].astype(dtype), lowrank[1].astype(dtype)) if fit.r else None
    node.inputs.clear()
    node.outputs.clear()
    emit_fastfood(em, x, rank, fit.d_in, fit.d_out, ff, lr, bias.astype(dtype), out=y)
