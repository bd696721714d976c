"""Parameters, FLOPs and bytes, per node and per model.

FLOPs count one multiply-add as 2 (Conv, ConvTranspose, Gemm, MatMul: 2·MACs, plus one per output
for a bias); element-wise and normalisation ops count a small constant per output element.
Figures are per sample. FLOPs are only defined at a shape: ``model_cost`` takes the input shapes
the calibration feeds actually have (``DataSource.signatures()``: one entry per distinct shape,
with its sample count) and averages the per-sample FLOPs over the samples; with a plain dict of
shapes, dynamic dims not given are fixed to 1. Where a shape stays unknown (static inference
fails and no data ran through the tensor) the count is None, never a guess.
Nodes whose inputs are all constants (a weight decoded in the graph, as pq emits) cost no FLOPs:
ONNX Runtime and TensorRT fold them once when the model is loaded.
Parameters are the elements of constant (initializer) inputs that are not scalars, each
initializer counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import concrete_input_shapes, import_graph, infer_shapes
from .model_io import lazy_tensors, serialized_size, weight_bytes

_ELEMENTWISE_COST = {
    "BatchNormalization": 2, "LayerNormalization": 8, "InstanceNormalization": 8, "Softmax": 5,
    "Gelu": 8, "Erf": 4, "Sigmoid": 4, "HardSigmoid": 2, "HardSwish": 3, "Tanh": 4, "Exp": 4,
    "Relu": 1, "Clip": 1, "LeakyRelu": 1, "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Pow": 1,
    "Sqrt": 1, "ReduceMean": 1, "GlobalAveragePool": 0, "MaxPool": 0, "AveragePool": 0,
}


@dataclass
class NodeCost:
    name: str
    op: str
    params: int
    flops: int
    out_shape: tuple | None
    flops_known: bool = True   # False: an output shape this node's FLOPs depend on is unknown


class _Tensor:
    """A node's input or output as ``node_costs`` reads it: ``constant`` (an initializer) with its
    ``shape`` and ``dtype``, or a computed tensor (shape from shape inference)."""

    __slots__ = ("name", "constant", "shape", "dtype")

    def __init__(self, name, constant=False, shape=None, dtype=None):
        self.name, self.constant, self.shape, self.dtype = name, constant, shape, dtype


class _Node:
    __slots__ = ("name", "op", "attrs", "inputs", "outputs")

    def __init__(self, name, op, attrs, inputs, outputs):
        self.name, self.op, self.attrs, self.inputs, self.outputs = name, op, attrs, inputs, outputs


# element types whose numpy dtype the graph import and ``tensor_dtype_to_np_dtype`` agree on
_PLAIN = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
          onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
          onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
_COUNTED_ATTRS = ("kernel_shape", "group", "transA")   # the attributes ``node_flops`` reads


def _nodes(model: onnx.ModelProto) -> list:
    """The model's top-level nodes as ``node_costs`` reads them, straight from the protobuf: an
    input named by an initializer is a constant with its dims, every other tensor computed (a
    Constant node's output too), as the graph import (``graph.import_graph``) sees them, without
    building the graph (its weights, subgraphs and tensor objects: most of the cost of counting a
    large model). A model with sparse initializers or initializers of element types numpy lacks
    goes through the graph import."""
    g = model.graph
    if len(g.sparse_initializer) or any(t.data_type not in _PLAIN for t in g.initializer):
        return [_Node(n.name, n.op, n.attrs,
                      [_Tensor(t.name, True, tuple(t.shape), t.dtype) if isinstance(t, gs.Constant) else _Tensor(t.name)
                       for t in n.inputs], [_Tensor(t.name) for t in n.outputs])
                for n in import_graph(model).nodes]
    consts = {t.name: _Tensor(t.name, True, tuple(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
              for t in g.initializer}
    out = []
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute if a.name in _COUNTED_ATTRS}
        out.append(_Node(n.name, n.op_type, attrs, [consts.get(i) or _Tensor(i) for i in n.input],
                         [_Tensor(o) for o in n.output]))
    return out


def _numel(shape):
    return int(np.prod(shape)) if shape is not None else 0


def _shape(info, tensor):
    if tensor.constant:
        return tensor.shape
    return info.get(tensor.name, (None, None))[0]


def _counted(op):
    return op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "MaxPool", "AveragePool", "GlobalAveragePool") \
        or _ELEMENTWISE_COST.get(op, 0) > 0


def node_flops(node, info: dict) -> int | None:
    """FLOPs of one node (``_nodes``) at the shapes in ``info``; None when a shape they depend on is
    unknown."""
    op = node.op
    outs = [_shape(info, o) for o in node.outputs]
    out = outs[0] if outs else None
    if out is None:
        return None if _counted(op) else 0
    n_out = _numel(out)
    if op in ("Conv", "ConvTranspose"):
        w = _shape(info, node.inputs[1])
        if w is None:
            return None
        group = node.attrs.get("group", 1)
        bias = n_out if len(node.inputs) > 2 else 0
        if op == "Conv":
            macs = n_out * int(np.prod(w[1:]))
        else:
            inp = _shape(info, node.inputs[0])
            macs = _numel(inp) * int(np.prod(w[1:])) if inp else n_out * int(np.prod(w[1:])) * w[0] // group
        return 2 * macs + bias
    if op == "Gemm":
        a = _shape(info, node.inputs[0])
        if a is None:
            return None
        k = a[0] if node.attrs.get("transA", 0) else a[-1]
        return 2 * n_out * k + (n_out if len(node.inputs) > 2 else 0)
    if op == "MatMul":
        a = _shape(info, node.inputs[0])
        if a is None:
            return None
        return 2 * n_out * a[-1]
    if op in ("MaxPool", "AveragePool"):
        k = node.attrs.get("kernel_shape", [1])
        return n_out * int(np.prod(k))
    if op == "GlobalAveragePool":
        inp = _shape(info, node.inputs[0])
        return _numel(inp) if inp is not None else None
    return n_out * _ELEMENTWISE_COST.get(op, 0)


def node_costs(model: onnx.ModelProto, sample_shapes: dict | None = None) -> list[NodeCost]:
    info = infer_shapes(model, concrete_input_shapes(model, sample_shapes, batch=1))
    counted = set()
    folded = set()  # tensors computed from constants only: runtimes fold them once at load time
    result = []
    for node in _nodes(model):
        static = bool(node.inputs) and all(t.constant or t.name in folded or not t.name for t in node.inputs)
        if static:
            folded.update(t.name for t in node.outputs)
        params = 0
        for t in node.inputs:
            if t.constant and t.name not in counted and len(t.shape) > 0:  # scalars (Clip bounds) are not weights
                counted.add(t.name)
                if np.issubdtype(np.dtype(t.dtype), np.floating) or t.dtype in (np.int8, np.uint8):
                    params += int(np.prod(t.shape))
        flops = 0 if static else node_flops(node, info)
        result.append(NodeCost(node.name, node.op, params, flops or 0,
                               _shape(info, node.outputs[0]) if node.outputs else None, flops is not None))
    return result


def signature_costs(model: onnx.ModelProto, shapes) -> list:
    """[(node costs, weight)]: ``shapes`` is a dict of input shapes, or a list of signatures
    ({"inputs": {name: shape}, "batch": b, "samples": n}); FLOPs are per sample (divided by b),
    weights are sample counts."""
    if isinstance(shapes, (list, tuple)):
        out = []
        for sig in shapes:
            costs = node_costs(model, sig["inputs"])
            b = max(int(sig.get("batch", 1)), 1)
            if b > 1:
                costs = [NodeCost(c.name, c.op, c.params, c.flops / b, c.out_shape, c.flops_known) for c in costs]
            out.append((costs, sig.get("samples", 1)))
        return out
    return [(node_costs(model, shapes), 1)]


def model_cost(model: onnx.ModelProto, sample_shapes=None) -> dict:
    """{"params", "flops", "bytes"}: FLOPs per sample averaged over the signatures' samples
    (``sample_shapes``: a dict of input shapes or a list of signatures), None when a node's
    FLOPs cannot be counted at those shapes."""
    per = signature_costs(model, sample_shapes)
    total = sum(w for _, w in per) or 1
    known = all(c.flops_known for costs, _ in per for c in costs)
    flops = sum(w * sum(c.flops for c in costs) for costs, w in per) / total
    return {
        "params": int(sum(c.params for c in per[0][0])),
        "flops": int(round(flops)) if known else None,
        "bytes": int(model_bytes(model)),
    }


def unknown_flops(model: onnx.ModelProto, sample_shapes=None) -> list:
    """Names of nodes whose FLOPs cannot be counted (a shape they need is unknown)."""
    return sorted({c.name for costs, _ in signature_costs(model, sample_shapes) for c in costs if not c.flops_known})


def model_bytes(model: onnx.ModelProto) -> int:
    """Size of the serialized model (weights included) in bytes."""
    lazy = lazy_tensors(model)
    if lazy:  # a large model's weights kept in their files
        return serialized_size(model) + sum(int(next(e.value for e in t.external_data if e.key == "length"))
                                            for t in lazy)
    w = weight_bytes(model)
    if w > 1_800_000_000:
        return w + 1024 * len(model.graph.node)
    return serialized_size(model)
