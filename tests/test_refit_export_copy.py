"""refit.refit_levels(export_copy=True): each level's model is exported from a copy, so the graph the
pass edits keeps its node order and its tensors' shapes; the models are the same either way."""

import contextlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphs import GraphBuilder

from onnxshrink import refit
from onnxshrink.calibrate import DataSource, collect
from onnxshrink.graph import import_graph


class Ctx:
    def __init__(self, reference, data):
        self.reference, self.data = reference, data

    def collect(self, requests, model_x=None, model_y=None, desc=""):
        return collect(self.data, requests, model_x, model_y, batch_size=64)

    @contextlib.contextmanager
    def timed(self, part):
        yield


def _chain():
    """x(N,8) -> Gemm(8->8) -> Relu -> Gemm(8->4) -> y, intermediate shapes inferred"""
    b = GraphBuilder(3)
    h = b.relu(b.gemm(b.input("x", ["N", 8]), 8, 8))
    b.gemm(h, 8, 4, out="y")
    b.output("y")
    return onnx.shape_inference.infer_shapes(b.model())


def _run(copy):
    model = _chain()
    graph = import_graph(model)
    gemms = [n for n in graph.nodes if n.op == "Gemm"]
    relu_out = next(n for n in graph.nodes if n.op == "Relu").outputs[0]
    assert relu_out.shape is not None

    def solve(key, stats, graph, level):
        """Put an Identity in front of the second Gemm, appended at the end of the node list."""
        node = next(n for n in graph.nodes if n.name == key)
        mid = gs.Variable(key + "_in", dtype=np.float32)
        graph.nodes.append(gs.Node("Identity", key + "_identity", inputs=[node.inputs[0]], outputs=[mid]))
        node.inputs[0] = mid
        return True

    ctx = Ctx(model, DataSource({"x": np.zeros((4, 8), np.float32)}))
    out = refit.refit_levels(ctx, model, [gemms[1].name], solve, graph=graph, export_copy=copy)
    return out, graph, relu_out


def test_export_copy_leaves_the_graph_as_built():
    out_copy, graph, relu_out = _run(True)
    assert graph.nodes[-1].op == "Identity" and relu_out.shape == ["N", 8]
    out_inplace, graph, relu_out = _run(False)
    assert graph.nodes[-1].op == "Gemm" and relu_out.shape is None     # sorted, shapes dropped
    assert [n.op_type for n in out_copy.graph.node] == ["Gemm", "Relu", "Identity", "Gemm"]
    assert out_copy.SerializeToString() == out_inplace.SerializeToString()
