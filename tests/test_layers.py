"""layers.WeightLayer: the d_in × d_out view of Conv/ConvTranspose/Gemm/MatMul, checked against
ONNX Runtime (y = x W + b on the layer's own feature rows), and writing it back."""

import numpy as np
import pytest
from graphs import GraphBuilder, run

from onnxshrink import layers as L
from onnxshrink.graph import export_model, import_graph, normalize
from onnxshrink.registry import Skip
from onnxshrink.stats import conv_patches


def _node(graph, op):
    return next(n for n in graph.nodes if n.op == op)


def _scaled(model, op, rng):
    """The model with the layer's output channels scaled by s and its bias by s (through
    matrix()/bias()/write()), and s: the output must be s ⊙ the original."""
    graph = import_graph(model)
    layer = L.WeightLayer.of(_node(graph, op), graph)
    assert isinstance(layer, L.WeightLayer)
    s = rng.uniform(0.5, 2.0, layer.d_out)
    b = layer.bias()
    layer.write(layer.matrix() * s, None if b is None else b * s)
    return export_model(graph, like=model), s


@pytest.mark.parametrize("group", [1, 2])
def test_conv_matrix_is_patches_times_weights(group, rng):
    """input(2,4,7,7) -> Conv(4->6, 3×3, group) -> y: every output = patch row · W + b."""
    b = GraphBuilder(1)
    x = b.input("x", [2, 4, 7, 7])
    b.conv(x, 4, 6, k=3, group=group, out="y")
    b.output("y")
    m = normalize(b.model())
    graph = import_graph(m)
    layer = L.WeightLayer.of(_node(graph, "Conv"), graph)
    assert (layer.d_in, layer.d_out, layer.group) == (4 // group * 9, 6, group)
    feed = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    y = run(m, {"x": feed})[0]
    pos = np.arange(49)
    patches = conv_patches(feed.astype(np.float64), layer.conv_attrs(), (7, 7), pos)   # (2·49, 4·9)
    w, bias = layer.matrix(), layer.bias()
    ref = np.moveaxis(y.reshape(2, 6, 49), 2, 1).reshape(-1, 6)
    cin = layer.d_in
    for j, (_, cols) in enumerate(layer.blocks()):
        got = patches[:, j * cin:(j + 1) * cin] @ w[:, cols] + bias[cols]
        np.testing.assert_allclose(got, ref[:, cols], atol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_matrix_bias_with_alpha_beta(trans_b, rng):
    """x(5,8) -> Gemm(8->3, transB, alpha 0.5, beta 2) -> y = x · matrix() + bias()."""
    b = GraphBuilder(2)
    x = b.input("x", [5, 8])
    b.gemm(x, 8, 3, trans_b=trans_b, out="y")
    b.nodes[-1].attribute.extend([__import__("onnx").helper.make_attribute("alpha", 0.5),
                                  __import__("onnx").helper.make_attribute("beta", 2.0)])
    b.output("y")
    m = b.model()
    graph = import_graph(m)
    layer = L.WeightLayer.of(_node(graph, "Gemm"), graph)
    feed = rng.standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(feed @ layer.matrix() + layer.bias(), run(m, {"x": feed})[0], atol=1e-5)
    scaled, s = _scaled(m, "Gemm", rng)
    np.testing.assert_allclose(run(scaled, {"x": feed})[0], run(m, {"x": feed})[0] * s, atol=1e-5)
    g2 = import_graph(scaled)
    assert _node(g2, "Gemm").attrs["alpha"] == 1.0 and _node(g2, "Gemm").attrs["beta"] == 1.0


def test_matmul_bias_add_rule_and_write(rng):
    """x(2,3,8) -> MatMul(8->4) -> Add(c of shape (1, 4)) -> y: the Add's constant is the bias."""
    b = GraphBuilder(3)
    x = b.input("x", [2, 3, 8])
    h = b.matmul(x, 8, 4)
    b.node("Add", [h, b.const(rng.standard_normal((1, 4)).astype(np.float32))], out="y")
    b.output("y")
    m = b.model()
    graph = import_graph(m)
    layer = L.WeightLayer.of(_node(graph, "MatMul"), graph)
    assert layer.bias_add is not None and layer.bias_add.op == "Add"
    feed = rng.standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(feed @ layer.matrix() + layer.bias(), run(m, {"x": feed})[0], atol=1e-5)
    scaled, s = _scaled(m, "MatMul", rng)
    np.testing.assert_allclose(run(scaled, {"x": feed})[0], run(m, {"x": feed})[0] * s, atol=1e-5)
    assert sum(n.op == "Add" for n in import_graph(scaled).nodes) == 1   # written into the same Add


def test_matmul_without_bias_add_gets_one(rng):
    """x(3,8) -> MatMul(8->4) -> y (a graph output): no bias Add; writing a bias adds one."""
    b = GraphBuilder(4)
    x = b.input("x", [3, 8])
    b.matmul(x, 8, 4, out="y")
    b.output("y")
    m = b.model()
    graph = import_graph(m)
    layer = L.WeightLayer.of(_node(graph, "MatMul"), graph)
    assert layer.bias_add is None and layer.bias() is None
    bias = rng.standard_normal(4)
    layer.write(layer.matrix(), bias)
    out = export_model(graph, like=m)
    feed = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": feed})[0], run(m, {"x": feed})[0] + bias, atol=1e-5)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_scale_outputs(group, rng):
    """x(1,4,5,5) -> ConvTranspose(4->6, 3×3, stride 2, group) -> y: scaling matrix() columns
    scales the output channels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = rng.standard_normal((4, 6 // group, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="ct", strides=[2, 2], group=group)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 11, 11])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    graph = import_graph(m)
    layer = L.WeightLayer.of(_node(graph, "ConvTranspose"), graph)
    assert (layer.d_in, layer.d_out) == (4 // group * 9, 6)
    np.testing.assert_array_equal(layer.bias(), bias.astype(np.float64))
    layer.write(layer.matrix())      # the layout round-trips exactly
    np.testing.assert_array_equal(layer.weight.values, w)
    scaled, s = _scaled(m, "ConvTranspose", rng)
    feed = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(scaled, feed)[0], run(m, feed)[0] * s[None, :, None, None], atol=1e-4)


def test_skips_and_checks():
    """Not a weight layer, a computed weight, a weight on the left: Skips with reasons; checks."""
    b = GraphBuilder(5)
    x = b.input("x", [8, 8])
    h = b.matmul(x, 8, 8)
    h2 = b.node("MatMul", [h, b.const(np.eye(8, dtype=np.float32))])   # shares nothing
    r = b.relu(h2)
    b.node("MatMul", [r, r], out="y")
    b.output("y")
    graph = import_graph(b.model())
    mm = [n for n in graph.nodes if n.op == "MatMul"]
    relu = _node(graph, "Relu")
    skip = L.WeightLayer.of(relu, graph)
    assert isinstance(skip, Skip) and "not a weight layer" in skip.reason
    skip = L.WeightLayer.of(mm[2], graph)
    assert isinstance(skip, Skip) and "computed at run time" in skip.reason
    assert isinstance(L.WeightLayer.of(mm[0], graph, L.not_shared, L.float_weights), L.WeightLayer)
    mm[1].inputs[1] = mm[0].inputs[1]            # now the first weight is read by two nodes
    layer = L.WeightLayer.of(mm[0], graph)
    assert [n.name for n in layer.shared] == [mm[0].name, mm[1].name] and layer.is_shared
    skip = L.WeightLayer.of(mm[0], graph, L.not_shared)
    assert isinstance(skip, Skip) and skip.reason == "weights are shared with other nodes"
    assert L.WeightLayer.of(mm[0], graph, L.ops("Gemm")).reason == "MatMul, not Gemm"


def test_shared_weight_write_leaves_other_reader(rng):
    """Two MatMuls read one weight; writing one reader gives it a copy under a fresh name."""
    b = GraphBuilder(6)
    x = b.input("x", [3, 8])
    h = b.matmul(x, 8, 8)
    b.output(b.node("MatMul", [h, b.nodes[-1].input[1]], out="y"))
    m = b.model()
    graph = import_graph(m)
    first, second = [n for n in graph.nodes if n.op == "MatMul"]
    w_name = first.inputs[1].name
    L.WeightLayer(first, graph).write(np.zeros((8, 8)))
    assert second.inputs[1].name == w_name and first.inputs[1].name != w_name
    assert np.abs(second.inputs[1].values).sum() > 0


def test_stats_request_rows_match_matrix(rng):
    """Gemm transA=1: the request reads the input's columns, so rows · matrix() + bias() = y."""
    from onnxshrink.calibrate import DataSource, collect
    from onnxshrink.lstsq import ridge_solve
    b = GraphBuilder(7)
    x = b.input("x", [8, "n"])
    b.gemm(x, 8, 3, out="y")
    b.nodes[-1].attribute.extend([__import__("onnx").helper.make_attribute("transA", 1)])
    b.output("y")
    m = b.model()
    graph = import_graph(m)
    layer = L.WeightLayer.of(_node(graph, "Gemm"), graph)
    data = DataSource({"x": rng.standard_normal((8, 40)).astype(np.float32)})
    acc = collect(data, [layer.stats_request("k")], m, batch_size=64)["k"]
    assert acc.n == 40
    w, bias = ridge_solve(acc, ridge=1e-10)
    np.testing.assert_allclose(w, layer.matrix(), atol=1e-4)
    np.testing.assert_allclose(bias, layer.bias(), atol=1e-4)


def test_channel_counts_of_each_op():
    import onnx_graphsurgeon as gs
    x = gs.Variable("x", dtype=np.float32)

    def layer(op, shape, **attrs):
        return L.WeightLayer(gs.Node(op, op, attrs, [x, gs.Constant("w", np.zeros(shape, np.float32))],
                                     [gs.Variable("y")]))
    conv = layer("Conv", (6, 2, 3, 3), group=2)
    assert (conv.c_in, conv.d_in, conv.d_out, conv.kernel) == (4, 18, 6, [3, 3])
    ct = layer("ConvTranspose", (4, 3, 3, 3), group=2)
    assert (ct.c_in, ct.d_in, ct.d_out) == (4, 18, 6)
    gemm = layer("Gemm", (5, 7), transB=1)
    assert (gemm.c_in, gemm.d_in, gemm.d_out) == (7, 7, 5)
    mm = layer("MatMul", (5, 7))
    assert (mm.c_in, mm.d_in, mm.d_out) == (5, 5, 7)
