"""Weight layers: one view of a Conv, ConvTranspose, Gemm or MatMul with a constant weight.

Every such node computes, per output position, y = x W + b with

- x a feature row: an im2col patch row (c, k1, k2, …) of one input group for a Conv (the layout of
  ``stats.conv_patches``), the input row for Gemm (transA=1: the column) and MatMul;
- W the d_in × d_out matrix ``matrix()``:
    Conv        W[o, c, k…]   ↔ M[(c, k…), o]                       (d_in = C/g·∏k, d_out = O)
    ConvTranspose W[c, o, k…] ↔ M[(c, k…), g·O/g + o] per group g   (d_in = C/g·∏k, d_out = O)
    Gemm        B (transB=1: d_out × d_in, else d_in × d_out) × alpha
    MatMul      B (d_in × d_out), a 2-D constant right operand
  For a grouped Conv/ConvTranspose, column o reads input group o // (O/g) only (``blocks()``);
  for ConvTranspose the rows are the kernel taps an input pixel spreads to (its statistics gather,
  per output position, the input pixel each tap maps there: ``stats.conv_transpose_patches``).
- b the bias ``bias()`` (d_out): Conv/ConvTranspose input 2, Gemm C × beta (one value per output
  or a scalar), and for MatMul the constant of the Add that follows it (``bias_add``).

The MatMul→Add bias rule (``bias_add``): the MatMul's output goes to exactly one node, not to the
graph's outputs, and that node is an Add of it and a constant that is one value per output column:
a scalar, (d_out,), or (1, …, 1, d_out) (or size 1). That Add's constant is the layer's bias.

A weight read by several nodes (an unrolled RNN's time steps, tied matrices) is ``shared``: every
reader is listed; a pass either treats the readers as one layer or leaves them, never rewrites the
weight under one reader only (``write`` gives such a reader a copy, under a fresh name).

``WeightLayer.of(node, graph, *checks)`` returns the layer, or a ``registry.Skip`` with the reason
when the node is not a weight layer or a check fails. A check is ``check(layer) -> str | None``: a
reason, or None when the layer is fine. The checks below are the common ones; a pass adds its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Emitter, read_values, set_constant_input
from .registry import Skip
from .stats import LayerStats

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def conv_attrs(node: gs.Node, weight_shape) -> dict:
    """kernel_shape, strides, dilations, pads, group of a Conv; ValueError for an ``auto_pad``
    other than NOTSET/VALID (``graph.normalize`` makes most explicit)."""
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


def per_column(shape, d_out: int) -> bool:
    """A constant of this shape adds one value per output column (a scalar, (d_out,), (1, d_out),
    …); (M, d_out) with M > 1 is a value per row."""
    shape = tuple(shape)
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, d_out))


def matmul_bias_add(node: gs.Node, d_out: int, graph_outputs=()) -> gs.Node | None:
    """The Add that adds a constant per-column vector to a MatMul's output, when it is that
    output's only consumer and the output is not a graph output (``graph_outputs``: names);
    else None. The module docstring states the rule."""
    y = node.outputs[0]
    if y.name in graph_outputs or len(y.outputs) != 1:
        return None
    add = y.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if not isinstance(other, gs.Constant):
        return None
    v = other.values
    if v.size not in (1, d_out) or not per_column(v.shape, d_out):
        return None
    return add


@dataclass(eq=False)
class WeightLayer:
    """A Conv/ConvTranspose/Gemm/MatMul node with a constant weight (see the module docstring)."""

    node: gs.Node
    graph: gs.Graph | None = None

    # ---------------------------------------------------------------- finding
    @classmethod
    def of(cls, node: gs.Node, graph: gs.Graph | None = None, *checks) -> "WeightLayer | Skip":
        """The layer of ``node``, or a Skip with the first reason: not a weight layer, or one of
        ``checks`` (``check(layer) -> str | None``) failing."""
        reason = cls.problem(node)
        if reason is not None:
            return Skip(node.name, reason)
        layer = cls(node, graph)
        for check in checks:
            reason = check(layer)
            if reason is not None:
                return Skip(node.name, reason)
        return layer

    @staticmethod
    def problem(node: gs.Node) -> str | None:
        """Why ``node`` is not a weight layer (None when it is)."""
        if node.op not in LAYER_OPS:
            return f"{node.op} is not a weight layer"
        if len(node.inputs) < 2:
            return "no weight input"
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            if node.op == "MatMul":
                if isinstance(node.inputs[0], gs.Constant):
                    return "constant weight on the left (W·x): not supported"
                return "MatMul whose right operand is computed at run time (no constant weight)"
            return "weights are not constants"
        if node.op == "MatMul" and isinstance(node.inputs[0], gs.Constant):
            return "left operand is a constant"
        if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            return "bias is not a constant"
        rank = len(w.shape)
        if node.op in ("Gemm", "MatMul") and rank != 2:
            return f"{node.op} weight of rank {rank}, not a matrix"
        if node.op in ("Conv", "ConvTranspose") and rank < 3:
            return f"{node.op} weight of rank {rank}"
        return None

    # ---------------------------------------------------------------- shape
    @property
    def op(self) -> str:
        return self.node.op

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def weight(self) -> gs.Constant:
        return self.node.inputs[1]

    @property
    def dtype(self):
        return self.weight.dtype if self.weight.dtype is not None else np.float32

    @property
    def group(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.op in ("Conv", "ConvTranspose") else 1

    @property
    def kernel(self) -> list:
        """The spatial kernel shape of a Conv/ConvTranspose ([] for Gemm/MatMul)."""
        return list(self.weight.shape[2:]) if self.op in ("Conv", "ConvTranspose") else []

    @property
    def d_in(self) -> int:
        """Rows of ``matrix()``: the features one output reads."""
        s = self.weight.shape
        if self.op == "Conv":
            return int(np.prod(s[1:]))
        if self.op == "ConvTranspose":
            return (s[0] // self.group) * int(np.prod(s[2:]))
        if self.op == "Gemm" and self.node.attrs.get("transB", 0):
            return s[1]
        return s[0]

    @property
    def c_in(self) -> int:
        """Input channels over all groups: a Conv/ConvTranspose input's axis 1 (C), else d_in."""
        s = self.weight.shape
        if self.op == "Conv":
            return s[1] * self.group
        if self.op == "ConvTranspose":
            return s[0]
        return self.d_in

    @property
    def d_out(self) -> int:
        """Output channels (columns of ``matrix()``)."""
        s = self.weight.shape
        if self.op == "Conv":
            return s[0]
        if self.op == "ConvTranspose":
            return s[1] * self.group
        if self.op == "Gemm" and self.node.attrs.get("transB", 0):
            return s[0]
        return s[1]

    def conv_attrs(self) -> dict:
        """``conv_attrs`` of a Conv (ValueError for an unsupported auto_pad)."""
        return conv_attrs(self.node, self.weight.shape)

    # ---------------------------------------------------------------- sharing, bias Add
    @property
    def shared(self) -> list:
        """Every node that reads the weight (this one included); one entry when not shared."""
        readers = list(self.weight.outputs)
        return readers if self.node in readers else [self.node] + readers

    @property
    def is_shared(self) -> bool:
        return len(self.shared) > 1

    @property
    def bias_add(self) -> gs.Node | None:
        """MatMul: the Add that holds its bias (the rule in the module docstring); else None."""
        if self.op != "MatMul":
            return None
        outs = {t.name for t in self.graph.outputs} if self.graph is not None else ()
        return matmul_bias_add(self.node, self.d_out, outs)

    def _bias_tensor(self):
        """(holder node, input index) of the bias constant, or None."""
        if self.op == "MatMul":
            add = self.bias_add
            if add is None:
                return None
            return add, (1 if add.inputs[0] is self.node.outputs[0] else 0)
        if len(self.node.inputs) > 2 and self.node.inputs[2].name:
            return self.node, 2
        return None

    @property
    def has_bias(self) -> bool:
        return self._bias_tensor() is not None

    # ---------------------------------------------------------------- values
    def matrix(self) -> np.ndarray:
        """W (d_in × d_out), float64 (Gemm: alpha folded in)."""
        w = read_values(self.weight)
        if self.op == "Conv":
            m = w.reshape(w.shape[0], -1).T
        elif self.op == "ConvTranspose":
            g = self.group
            c, og = w.shape[:2]
            k = int(np.prod(w.shape[2:]))
            m = w.reshape(g, c // g, og, k).transpose(1, 3, 0, 2).reshape((c // g) * k, g * og)
        elif self.op == "Gemm":
            m = w.T if self.node.attrs.get("transB", 0) else w
            alpha = self.node.attrs.get("alpha", 1.0)
            m = m * alpha if alpha != 1.0 else m
        else:
            m = w
        return m.astype(np.float64)

    def blocks(self) -> list:
        """[(row slice, column slice)] of ``matrix()`` per group: group j's outputs read only its
        rows (all rows, one block, for group 1 and Gemm/MatMul: a grouped Conv's matrix holds the
        groups side by side, every column over the C/g·∏k rows of its own group)."""
        g = self.group
        og = self.d_out // g
        return [(slice(None), slice(j * og, (j + 1) * og)) for j in range(g)]

    def bias(self) -> np.ndarray | None:
        """b (d_out), float64, or None when the layer has none (Gemm: C × beta)."""
        at = self._bias_tensor()
        if at is None:
            return None
        holder, i = at
        v = read_values(holder.inputs[i]).astype(np.float64)
        if self.op == "Gemm":
            beta = self.node.attrs.get("beta", 1.0)
            return np.broadcast_to(v.reshape(-1) * beta, (self.d_out,)).copy()
        if self.op == "MatMul":
            return np.broadcast_to(v.reshape(-1), (self.d_out,)).copy()
        return v

    def write(self, matrix: np.ndarray, bias: np.ndarray | None = None, kernel=None) -> None:
        """Set the weight to ``matrix`` (d_in' × d_out', in ``matrix()``'s layout, the weight's
        dtype) and, when given, the bias to ``bias`` (d_out'). Conv: ``kernel`` is the new
        spatial kernel shape (default: as it is), the input channel count follows from the rows.
        Gemm: alpha and beta become 1. MatMul: the bias goes into its ``bias_add`` constant, or a
        new Add is made. A weight or bias other nodes share is left to them: this node gets a copy
        under a fresh name."""
        dtype = read_values(self.weight).dtype
        if self.op == "Conv":
            k = self.kernel if kernel is None else list(kernel)
            w = matrix.T.reshape([matrix.shape[1], -1] + k)
        elif self.op == "ConvTranspose":
            k = self.kernel if kernel is None else list(kernel)
            g = self.group
            kk = int(np.prod(k))
            cg, og = matrix.shape[0] // kk, matrix.shape[1] // g
            w = matrix.reshape(cg, kk, g, og).transpose(2, 0, 3, 1).reshape([g * cg, og] + k)
        elif self.op == "Gemm":
            w = matrix.T if self.node.attrs.get("transB", 0) else matrix
            self.node.attrs["alpha"] = 1.0
            self.node.attrs["beta"] = 1.0
        else:
            w = matrix
        set_constant_input(self.node, 1, w.astype(dtype), self.graph)
        if bias is None:
            return
        if self.op == "MatMul":
            old = self.bias()
            self.add_bias(bias - old if old is not None else bias)
            return
        set_constant_input(self.node, 2, bias.astype(dtype), self.graph, base=self.node.name + "_bias")

    def set_bias(self, bias: np.ndarray, base: str | None = None) -> None:
        """Set the bias to ``bias`` (d_out), the weight as it is. Conv/ConvTranspose/Gemm: input 2
        (Gemm: beta becomes 1 where it was not); a new input, or a copy of one other nodes share,
        is named from ``base`` (default ``{node}_bias``). MatMul: through ``add_bias``."""
        if self.op == "MatMul":
            old = self.bias()
            self.add_bias(bias - old if old is not None else bias)
            return
        if self.op == "Gemm" and self.node.attrs.get("beta", 1.0) != 1.0:
            self.node.attrs["beta"] = 1.0
        set_constant_input(self.node, 2, bias.astype(read_values(self.weight).dtype), self.graph,
                           base=base or self.node.name + "_bias")

    def add_bias(self, delta: np.ndarray) -> None:
        """Add ``delta`` (d_out) to the layer's bias. MatMul: into its ``bias_add`` constant (in
        that constant's shape), else through a new Add that takes over the output tensor."""
        if self.op != "MatMul":
            old = self.bias()
            new = delta if old is None else old + delta
            if self.op == "Gemm":
                self.node.attrs["beta"] = 1.0
            set_constant_input(self.node, 2, new.astype(read_values(self.weight).dtype), self.graph,
                               base=self.node.name + "_bias")
            return
        add = self.bias_add
        graph = self.graph
        if add is not None:
            j = 1 if add.inputs[0] is self.node.outputs[0] else 0
            v = read_values(add.inputs[j])
            new = v.astype(np.float64) + delta.reshape([1] * max(v.ndim - 1, 0) + [-1])
            set_constant_input(add, j, new.astype(v.dtype), graph)
            return
        if graph is None:
            raise ValueError("a MatMul without a bias Add needs the graph to add one")
        out = self.node.outputs[0]
        em = Emitter(graph, dtype=read_values(self.weight).dtype)
        pre = gs.Variable(em.name("", out.name + "_pre_bias"), dtype=out.dtype)
        self.node.outputs[0] = pre
        em.op("Add", [pre, em.const(delta, name=self.node.name + "_bias_value")], out=out, name=self.node.name + "_bias")
        graph.toposort()

    # ---------------------------------------------------------------- statistics
    def stats_request(self, key: str, x: str | None = None, y: str | None = None, positions: int = 32,
                      rows_per_batch: int = 0) -> LayerStats:
        """The ``stats.LayerStats`` whose feature rows match ``matrix()``'s rows: the input ``x``
        (default: the node's input) and target ``y`` (default: the node's output; "" for none) at
        ``positions`` sampled output positions per sample of a Conv, or every row (at most
        ``rows_per_batch`` per batch) of a Gemm/MatMul. A grouped Conv's rows are those of all
        groups, C·∏k: group j's rows are [j·C/g·∏k, (j+1)·C/g·∏k). A ConvTranspose's rows are the
        input pixels its kernel taps map onto each sampled output position, zero where a tap maps
        none (``stats.conv_transpose_patches``; it has no ``output_shape`` statistics). ValueError
        for a Conv/ConvTranspose whose pads are not explicit or one with an ``output_shape``."""
        x = self.node.inputs[0].name if x is None else x
        y = self.node.outputs[0].name if y is None else (y or None)
        if self.op == "Conv":
            attrs = self.conv_attrs()
            return LayerStats(key, x, y, kind="conv", conv_attrs=attrs, positions=positions)
        if self.op == "ConvTranspose":
            if "output_shape" in self.node.attrs:
                raise ValueError("ConvTranspose with an output_shape attribute (implicit pads)")
            attrs = self.conv_attrs()
            nd = len(attrs["kernel_shape"])
            attrs["output_padding"] = list(self.node.attrs.get("output_padding", [0] * nd))
            return LayerStats(key, x, y, kind="convtranspose", conv_attrs=attrs, positions=positions)
        if self.op == "Gemm":
            return LayerStats(key, x, y, kind="linear", transpose_x=bool(self.node.attrs.get("transA", 0)),
                              rows_per_batch=rows_per_batch)
        if self.op == "MatMul":
            return LayerStats(key, x, y, kind="linear", rows_per_batch=rows_per_batch)
        raise ValueError(f"no layer statistics for op {self.op}")


# ----------------------------------------------------------------------------- common checks
def float_weights(layer: WeightLayer) -> str | None:
    dt = read_values(layer.weight).dtype
    return None if np.issubdtype(dt, np.floating) else f"weights of type {dt}"


def not_shared(layer: WeightLayer) -> str | None:
    return "weights are shared with other nodes" if layer.is_shared else None


def finite(layer: WeightLayer) -> str | None:
    b = layer.bias()
    if not np.isfinite(read_values(layer.weight)).all() or (b is not None and not np.isfinite(b).all()):
        return "weights or bias contain NaN or Inf values"
    return None


def no_trans_a(layer: WeightLayer) -> str | None:
    return "Gemm with transA=1" if layer.op == "Gemm" and layer.node.attrs.get("transA", 0) else None


def per_column_bias(layer: WeightLayer) -> str | None:
    """A Gemm's C that differs between rows (M × N) has no place in a rewritten layer."""
    if layer.op != "Gemm" or len(layer.node.inputs) < 3 or not layer.node.inputs[2].name:
        return None
    c = layer.node.inputs[2]
    if c.values.size not in (1, layer.d_out):
        return f"Gemm bias of shape {tuple(c.values.shape)} differs between rows"
    return None


def explicit_pads(layer: WeightLayer) -> str | None:
    if layer.op != "Conv":
        return None
    try:
        layer.conv_attrs()
    except ValueError as e:
        return str(e)
    return None


def ops(*names):
    """A check that the layer is one of the ops ``names``."""
    def check(layer: WeightLayer) -> str | None:
        return None if layer.op in names else f"{layer.op}, not {'/'.join(names)}"
    return check
