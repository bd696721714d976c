"""foldbn: exact to float tolerance; skips with reasons."""

import numpy as np
import pytest
from graphs import GraphBuilder, assert_close, conv_bn_net

from onnxshrink import shrink


def _ops(model):
    return [n.op_type for n in model.graph.node]


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
    r = shrink(m, ["foldbn"], calibration=feeds)
    assert _ops(r.model) == ["Gemm"]
    assert_close(m, r.model, feeds)


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
    r = shrink(m, ["foldbn"], calibration=feeds)
    assert _ops(r.model) == ["ConvTranspose"]
    assert_close(m, r.model, feeds)


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
