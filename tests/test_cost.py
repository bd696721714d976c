"""FLOPs / params / bytes accounting."""

import numpy as np
from graphs import GraphBuilder, conv_bn_net

from onnxshrink.cost import model_cost, node_costs


def test_conv_gemm_flops_and_params():
    """input(N,3,8,8) -> Conv(3->8,3x3,pad1) -> Relu -> GAP -> Flatten -> Gemm(8->10)"""
    b = GraphBuilder()
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 8))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    b.gemm(h, 8, 10, out="logits")
    b.output("logits")
    costs = {c.op: c for c in node_costs(b.model())}
    assert costs["Conv"].params == 8 * 3 * 9 + 8
    assert costs["Conv"].flops == 2 * (8 * 8 * 8) * (3 * 9) + 8 * 8 * 8
    assert costs["Relu"].flops == 8 * 8 * 8
    assert costs["GlobalAveragePool"].flops == 8 * 8 * 8
    assert costs["Gemm"].flops == 2 * 10 * 8 + 10
    assert costs["Gemm"].params == 8 * 10 + 10


def test_strided_grouped_conv_and_matmul():
    b = GraphBuilder()
    x = b.input("input", ["batch", 8, 10, 10])
    h = b.conv(x, 8, 8, k=3, stride=2, group=8, bias=False)   # depthwise, out 5x5
    h = b.node("Reshape", [h, b.const(np.array([-1, 8, 25], dtype=np.int64))])
    h = b.node("Transpose", [h], perm=[0, 2, 1])              # (N, 25, 8)
    b.matmul(h, 8, 4, out="y")
    b.output("y")
    costs = {c.op: c for c in node_costs(b.model())}
    assert costs["Conv"].flops == 2 * (8 * 5 * 5) * 9
    assert costs["MatMul"].flops == 2 * 25 * 4 * 8
    assert costs["Reshape"].params == 0  # int64 shape constants are not parameters


def test_sample_shapes_fix_dynamic_spatial_dims():
    b = GraphBuilder()
    x = b.input("input", ["batch", 3, "h", "w"])
    b.conv(x, 3, 4, out="y")
    b.output("y")
    m = b.model()
    small = model_cost(m, {"input": (3, 4, 4)})["flops"]
    big = model_cost(m, {"input": (3, 8, 8)})["flops"]
    assert big == 4 * small


def test_model_bytes_is_serialized_size():
    m = conv_bn_net()
    assert model_cost(m)["bytes"] == len(m.SerializeToString())


def test_constant_subgraphs_cost_no_flops():
    """codes, codebook -> Gather -> Reshape -> Add(offset) -> W ; input -> MatMul(W) -> y : only the MatMul costs"""
    b = GraphBuilder()
    x = b.input("input", ["batch", 4])
    book = b.const(np.arange(8, dtype=np.float32).reshape(4, 2))
    codes = b.const(np.array([0, 1, 2, 3], dtype=np.int64))
    w = b.node("Reshape", [b.node("Gather", [book, codes]), b.const(np.array([4, 2], dtype=np.int64))])
    w = b.node("Add", [w, b.const(np.float32(1.0))])
    b.node("MatMul", [x, w], out="y")
    b.output("y")
    costs = {c.op: c for c in node_costs(b.model())}
    assert costs["Gather"].flops == 0 and costs["Reshape"].flops == 0 and costs["Add"].flops == 0
    assert costs["MatMul"].flops == 2 * 2 * 4
    assert model_cost(b.model())["flops"] == 2 * 2 * 4


def test_counts_read_from_the_protobuf_are_the_graph_imports(monkeypatch):
    """``node_costs`` reads the nodes straight from the protobuf; on graphs with shared weights,
    Constant nodes, an empty optional input, scalars and int64 constants its counts are those it
    gives through the graph import (the path kept for element types numpy lacks)."""
    import zoo
    from onnx import helper, numpy_helper
    from onnxshrink import cost
    b = GraphBuilder()
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.conv(x, 3, 4)
    h = b.node("Clip", [h, "", b.const(np.float32(6.0))])
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    w = b.const(np.ones((4, 4), np.float32))
    h = b.node("MatMul", [b.node("MatMul", [h, w]), w], out="y")
    b.output("y")
    m = b.model()
    m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(4, np.float32))))
    m.graph.node.append(helper.make_node("Add", ["y", "k"], ["z"]))
    m.graph.output.append(helper.make_tensor_value_info("z", 1, None))
    models = [m, conv_bn_net(), zoo.build("resnet_basic_op13").model, zoo.build("constant_weights_op13").model]
    direct = [node_costs(mm) for mm in models]
    monkeypatch.setattr(cost, "_PLAIN", set())   # every model through the graph import
    assert direct == [node_costs(mm) for mm in models]
    assert [c.params for c in direct[0] if c.op == "MatMul"] == [16, 0]   # a shared weight counted once
