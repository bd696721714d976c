"""Small hand-built graphs for tests (random weights: structure only) and the shared
``assert_close`` helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxruntime as ort

from onnxshrink.validate import Tolerances

# Validation with every numeric check off (structure only: checker, ONNX Runtime load, names and
# dtypes). For tests of a rewrite's *structure* on random-weight models compressed hard (low
# energies, no channel rounding, a few random calibration samples): the default gate rightly calls
# many of those results broken (relative L2 0.2–0.6 on white-noise features), which is not what such
# a test is about. A test using it bounds the numbers it cares about itself, or none.
NO_NUMERIC_CHECKS = Tolerances(max_error=None, min_cosine=None, min_top1=None, max_rel_l2=None,
                               max_range_error=None, min_worst_cosine=None, min_decision_iou=None)


class GraphBuilder:
    """A tiny onnx.helper wrapper: ``b.conv("x", 8, 3)`` adds a Conv with random weights and
    returns the output tensor name."""

    def __init__(self, seed=0, opset=17):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.opset = opset
        self.shapes = {}
        self._k = 0

    def name(self, base):
        self._k += 1
        return f"{base}_{self._k}"

    def const(self, value, base="c"):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def input(self, name, shape, dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name, shape=None, dtype=TensorProto.FLOAT):
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def node(self, op, inputs, n_out=1, out=None, **attrs):
        nm = self.name(op.lower())
        outs = [out] if out else [f"{nm}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=nm, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, c_in, c_out, k=3, stride=1, pad=None, dilation=1, group=1, bias=True, nd=2, out=None):
        pad = (k // 2) * dilation if pad is None else pad
        w = self.rng.standard_normal((c_out, c_in // group) + (k,) * nd).astype(np.float32)
        w *= np.sqrt(2.0 / (c_in // group * k ** nd))
        ins = [x, self.const(w, "w")]
        if bias:
            ins.append(self.const(0.1 * self.rng.standard_normal(c_out).astype(np.float32), "b"))
        return self.node("Conv", ins, out=out, kernel_shape=[k] * nd, strides=[stride] * nd,
                         pads=[pad] * (2 * nd), dilations=[dilation] * nd, group=group)

    def bn(self, x, c, out=None):
        r = self.rng
        vals = [r.uniform(0.5, 1.5, c), 0.1 * r.standard_normal(c), 0.1 * r.standard_normal(c), r.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x] + [self.const(v.astype(np.float32), "bn") for v in vals],
                         out=out, epsilon=1e-5)

    def gemm(self, x, d_in, d_out, trans_b=1, bias=True, out=None):
        w = (self.rng.standard_normal((d_out, d_in) if trans_b else (d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
        ins = [x, self.const(w, "w")]
        if bias:
            ins.append(self.const(0.1 * self.rng.standard_normal(d_out).astype(np.float32), "b"))
        return self.node("Gemm", ins, out=out, transB=trans_b)

    def matmul(self, x, d_in, d_out, out=None):
        w = (self.rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
        return self.node("MatMul", [x, self.const(w, "w")], out=out)

    def relu(self, x, out=None):
        return self.node("Relu", [x], out=out)

    def model(self, ir_version=None):
        g = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = ir_version or min(m.ir_version, 10)
        for o in m.graph.output:
            if not o.type.tensor_type.HasField("shape"):
                o.type.tensor_type.ClearField("shape")
        inf = onnx.shape_inference.infer_shapes(m)
        inferred = {v.name: v for v in list(inf.graph.value_info) + list(inf.graph.output)}
        for o in m.graph.output:
            if not o.type.tensor_type.HasField("shape") and inferred.get(o.name) is not None \
                    and inferred[o.name].type.tensor_type.HasField("shape"):
                o.CopyFrom(inferred[o.name])
        onnx.checker.check_model(m)
        return m


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(original, rewritten, feeds, rtol=1e-4, atol=1e-4):
    """Both models run on the feeds and give the same outputs to tolerance."""
    a = run(original, feeds)
    b = run(rewritten, feeds)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * max(1.0, float(np.abs(x).max())))


def gemm_chain(seed, widths):
    """x(N, widths[0]) -> Gemm -> Relu -> … -> Gemm -> y(N, widths[-1])"""
    b = GraphBuilder(seed)
    h = b.input("x", ["N", widths[0]])
    pairs = list(zip(widths[:-1], widths[1:]))
    for i, (di, do) in enumerate(pairs):
        last = i == len(pairs) - 1
        h = b.gemm(h, di, do, out="y" if last else None)
        if not last:
            h = b.relu(h)
    b.output("y")
    return b.model()


def disturbed_gemms(model, rng, scale=0.3):
    """``model`` with every Gemm's weight moved by ``scale`` × standard normal noise (its bias kept)."""
    from onnxshrink.graph import export_model, import_graph
    from onnxshrink.layers import WeightLayer
    graph = import_graph(model)
    for n in graph.nodes:
        if n.op == "Gemm":
            layer = WeightLayer(n, graph)
            layer.write(layer.matrix() + scale * rng.standard_normal((layer.d_in, layer.d_out)), layer.bias())
    return export_model(graph, like=model)


def refit_gemms(ctx, ref, bad, ridge, desc="t"):
    """``bad`` with each Gemm refit toward ``ref`` by ``refit.refit_levels`` (one ridge solve a
    layer, at relative ridge ``ridge``), with ``ctx`` (a PassContext or a stand-in)."""
    from onnxshrink import refit
    from onnxshrink.graph import import_graph
    from onnxshrink.layers import WeightLayer
    from onnxshrink.lstsq import ridge_solve
    names = [n.name for n in import_graph(ref).nodes if n.op == "Gemm"]

    def requests(key, graph):
        return [WeightLayer(next(n for n in graph.nodes if n.name == key), graph).stats_request(key)]

    def solve(key, stats, graph, level):
        return ridge_solve(stats[key], ridge)

    def write(key, wb, graph, level):
        WeightLayer(next(n for n in graph.nodes if n.name == key), graph).write(*wb)

    return refit.refit_levels(ctx, bad, names, solve, write, requests=requests, desc=desc)


def conv_bn_net(seed=0, c=8, with_gemm=True):
    """input(N,3,8,8) -> Conv -> BN -> Relu -> Conv -> BN -> Relu -> GAP -> Flatten -> Gemm -> logits

    A plain CNN with unfused BatchNormalization."""
    b = GraphBuilder(seed)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.relu(b.bn(b.conv(x, 3, c, bias=False), c))
    h = b.relu(b.bn(b.conv(h, c, 2 * c, stride=2), 2 * c))
    h = b.node("GlobalAveragePool", [h])
    h = b.node("Flatten", [h], axis=1)
    b.gemm(h, 2 * c, 10, out="logits")
    b.output("logits", ["batch", 10])
    return b.model()
