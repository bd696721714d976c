"""graph.Emitter: the one node builder; names are always fresh."""

import numpy as np
import onnx_graphsurgeon as gs
from graphs import run

from onnxshrink.graph import Emitter, export_model


def test_emitter_builds_a_runnable_graph_with_fresh_names(rng):
    """x(N,4) -> MatMul(W) -> Add(b) -> y, where the names the builder would pick are taken."""
    x = gs.Variable("x", dtype=np.float32, shape=["N", 4])
    taken = gs.Variable("p/MatMul_2", dtype=np.float32)      # a tensor named like the first node will be (W is p/W_1)
    graph = gs.Graph(inputs=[x], opset=17)
    graph.nodes.append(gs.Node("Relu", "relu", inputs=[x], outputs=[taken]))
    em = Emitter(graph, "p")
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    h = em.op("MatMul", [taken, em.const(w, "W")])
    y = em.op("Add", [h, em.const(b, name="bias")], name="the_add")
    y.name, y.shape = "y", ["N", 3]
    graph.outputs = [y]
    names = [n.name for n in graph.nodes] + list(graph.tensors())
    assert len(names) == len(set(names))
    assert em.nodes[0].name == "p/MatMul_2_1" and em.nodes[1].name == "the_add"
    model = export_model(graph)
    feed = rng.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": feed})[0], np.maximum(feed, 0) @ w + b, atol=1e-5)


def test_shared_constants_are_made_once(rng):
    graph = gs.Graph(opset=17)
    shared = {}
    a = Emitter(graph, "a", shared).shared_const("k", lambda: np.ones(2, np.float32), "one")
    b = Emitter(graph, "b", shared).shared_const("k", lambda: np.zeros(2, np.float32), "one")
    assert a is b and a.name == "one"
