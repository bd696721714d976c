"""foldbn: exact to float tolerance; skips with reasons."""

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, assert_close, conv_bn_net

from onnxshrink import shrink


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _fold_exactly(m, feeds, ops):
    """Run foldbn; the result has exactly ``ops`` and the original's outputs."""
    r = shrink(m, ["foldbn"], calibration=feeds)
    assert _ops(r.model) == ops
    assert_close(m, r.model, feeds)
    return r


def test_fold_conv_and_gemm_exact(rng):
    m = conv_bn_net()
    x = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    r = shrink(m, ["foldbn"], calibration={"input": x})
    assert "BatchNormalization" not in _ops(r.model)
    assert len(r.report["passes"][0]["changed"]) == 2
    assert_close(m, r.model, {"input": x}, rtol=1e-5, atol=1e-5)
    assert r.report["after"]["params"] < r.report["before"]["params"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_gemm_bn(trans_b, rng):
    """input(N,16) -> Gemm -> BN -> y"""
    b = GraphBuilder()
    x = b.input("input", ["batch", 16])
    b.bn(b.gemm(x, 16, 8, trans_b=trans_b), 8, out="y")
    b.output("y")
    m = b.model()
    feeds = {"input": rng.standard_normal((10, 16)).astype(np.float32)}
    _fold_exactly(m, feeds, ["Gemm"])


@pytest.mark.parametrize("group", [1, 2])
def test_fold_conv_transpose(group, rng):
    """input(N,4,5,5) -> ConvTranspose(4->6, group) -> BN -> y"""
    b = GraphBuilder()
    x = b.input("input", ["batch", 4, 5, 5])
    w = b.const(rng.standard_normal((4, 6 // group, 3, 3)).astype(np.float32))
    h = b.node("ConvTranspose", [x, w], strides=[2, 2], kernel_shape=[3, 3], group=group)
    b.bn(h, 6, out="y")
    b.output("y")
    m = b.model()
    feeds = {"input": rng.standard_normal((4, 4, 5, 5)).astype(np.float32)}
    _fold_exactly(m, feeds, ["ConvTranspose"])


def test_skips_have_reasons(rng):
    """input -> Relu -> BN -> y ; input -> Conv -> {BN -> y2, y3 (graph output)}"""
    b = GraphBuilder()
    x = b.input("input", ["batch", 3, 6, 6])
    b.bn(b.relu(x), 3, out="y")
    c = b.conv(x, 3, 4, out="y3")
    b.bn(c, 4, out="y2")
    for name in ("y", "y2", "y3"):
        b.output(name)
    m = b.model()
    feeds = {"input": rng.standard_normal((5, 3, 6, 6)).astype(np.float32)}
    r = shrink(m, ["foldbn"], calibration=feeds)
    skipped = r.report["passes"][0]["skipped"]
    reasons = " | ".join(s["reason"] for s in skipped)
    assert len(skipped) == 2 and "Relu" in reasons and "other consumers" in reasons
    assert_close(m, r.model, feeds)


def _conv(b, x, bias):
    w = b.const(b.rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    return b.node("Conv", [x, w] + ([bias] if bias else []), kernel_shape=[3, 3], pads=[1, 1, 1, 1])


def test_bias_shared_by_two_convs(rng):
    """input -> Conv(w1, b) -> BN ─┐
       input -> Conv(w2, b) -> BN ─┴ Add -> y   (one bias initializer feeds both Convs)"""
    b = GraphBuilder(1)
    x = b.input("input", ["batch", 3, 8, 8])
    bias = b.const(0.1 * rng.standard_normal(4).astype(np.float32), "shared_b")
    b.node("Add", [b.bn(_conv(b, x, bias), 4), b.bn(_conv(b, x, bias), 4)], out="y")
    b.output("y")
    m = b.model()
    feeds = {"input": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    _fold_exactly(m, feeds, ["Conv", "Conv", "Add"])


def test_new_bias_name_does_not_collide(rng):
    """input -> Conv (no bias) -> BN -> Add(c) -> y, where c is named like the bias foldbn adds"""
    b = GraphBuilder(2)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.bn(_conv(b, x, None), 4)
    conv_name = b.nodes[-2].name
    c = conv_name + "_bias"
    b.inits.append(onnx.numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), c))
    b.node("Add", [h, c], out="y")
    b.output("y")
    m = b.model()
    feeds = {"input": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    _fold_exactly(m, feeds, ["Conv", "Add"])


@pytest.mark.parametrize("c_shape", [(1, 5), (1,), ()])
def test_gemm_bias_broadcast_alpha_beta(c_shape, rng):
    """input(N,6) -> Gemm(alpha=0.5, beta=2, C of shape (1,5)/(1,)/()) -> BN -> y"""
    b = GraphBuilder(3)
    x = b.input("input", ["batch", 6])
    w = b.const(rng.standard_normal((6, 5)).astype(np.float32), "w")
    c = b.const(rng.standard_normal(c_shape).astype(np.float32), "c")
    b.bn(b.node("Gemm", [x, w, c], alpha=0.5, beta=2.0), 5, out="y")
    b.output("y")
    m = b.model()
    feeds = {"input": rng.standard_normal((4, 6)).astype(np.float32)}
    _fold_exactly(m, feeds, ["Gemm"])


def test_gemm_bias_per_row_is_skipped(rng):
    """input(2,6) -> Gemm(C of shape (2,5): a bias per row, not per channel) -> BN -> y"""
    b = GraphBuilder(4)
    x = b.input("input", [2, 6])
    w = b.const(rng.standard_normal((6, 5)).astype(np.float32), "w")
    c = b.const(rng.standard_normal((2, 5)).astype(np.float32), "c")
    b.bn(b.node("Gemm", [x, w, c]), 5, out="y")
    b.output("y")
    m = b.model()
    feeds = {"input": rng.standard_normal((2, 6)).astype(np.float32)}
    r = shrink(m, ["foldbn"], calibration=feeds, validation=feeds)
    assert "per-channel" in r.report["passes"][0]["skipped"][0]["reason"]
    assert_close(m, r.model, feeds)


def test_fold_float16_model(rng):
    """conv_bn_net with float16 weights, input and output: folded in float64, stored as float16"""
    m = conv_bn_net()
    for t in m.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    x = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)  # cast to float16 by the data source
    r = shrink(m, ["foldbn"], calibration=x)
    assert "BatchNormalization" not in _ops(r.model)
    assert {t.data_type for t in r.model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert_close(m, r.model, {"input": x[:4].astype(np.float16)}, rtol=1e-2, atol=1e-2)
