"""refit.refit_levels: the sequential refit loop, on a chain of Gemms whose weights were disturbed."""

import contextlib

import numpy as np
from graphs import GraphBuilder, run

from onnxshrink import refit
from onnxshrink.calibrate import DataSource, collect
from onnxshrink.graph import import_graph
from onnxshrink.layers import WeightLayer
from onnxshrink.lstsq import ridge_solve


class Ctx:
    """The part of PassContext the loop uses; counts the calibration runs."""

    def __init__(self, reference, data):
        self.reference, self.data, self.runs = reference, data, []

    def collect(self, requests, model_x=None, model_y=None, desc=""):
        self.runs.append(desc)
        return collect(self.data, requests, model_x, model_y, batch_size=64)

    @contextlib.contextmanager
    def timed(self, part):
        yield


def _chain(seed):
    """x(N,8) -> Gemm(8->8) -> Relu -> Gemm(8->8) -> Relu -> Gemm(8->4) -> y"""
    b = GraphBuilder(seed)
    h = b.input("x", ["N", 8])
    for i, d in enumerate((8, 8, 4)):
        h = b.gemm(h, 8, d, out="y" if i == 2 else None)
        if i < 2:
            h = b.relu(h)
    b.output("y")
    return b.model()


def _disturbed(model, rng):
    graph = import_graph(model)
    for n in graph.nodes:
        if n.op == "Gemm":
            layer = WeightLayer(n, graph)
            layer.write(layer.matrix() + 0.3 * rng.standard_normal((layer.d_in, layer.d_out)), layer.bias())
    from onnxshrink.graph import export_model
    return export_model(graph, like=model)


def test_refit_levels_restores_the_reference(rng):
    ref = _chain(0)
    bad = _disturbed(ref, rng)
    data = DataSource({"x": rng.standard_normal((300, 8)).astype(np.float32)})
    ctx = Ctx(ref, data)
    names = [n.name for n in import_graph(ref).nodes if n.op == "Gemm"]

    def requests(key, graph):
        return [WeightLayer(next(n for n in graph.nodes if n.name == key), graph).stats_request(key)]

    def solve(key, stats, graph, level):
        return ridge_solve(stats[key], 1e-9)

    def write(key, wb, graph, level):
        WeightLayer(next(n for n in graph.nodes if n.name == key), graph).write(*wb)

    out = refit.refit_levels(ctx, bad, names, solve, write, requests=requests, desc="t")
    assert ctx.runs == ["t 1/3", "t 2/3", "t 3/3"]       # one run per level, each on the refit model
    feed = {"x": rng.standard_normal((50, 8)).astype(np.float32)}
    y_ref, y_bad, y_out = run(ref, feed)[0], run(bad, feed)[0], run(out, feed)[0]
    assert np.abs(y_bad - y_ref).max() > 0.1
    np.testing.assert_allclose(y_out, y_ref, atol=1e-3)


def test_unchanged_levels_use_statistics_gathered_ahead_and_again(rng):
    ref = _chain(1)
    data = DataSource({"x": rng.standard_normal((100, 8)).astype(np.float32)})
    ctx = Ctx(ref, data)
    names = [n.name for n in import_graph(ref).nodes if n.op == "Gemm"]
    seen = []

    def requests(key, graph):
        return [WeightLayer(next(n for n in graph.nodes if n.name == key), graph).stats_request(key)]

    def fit(key, stats, graph, level):
        seen.append((level.index, sorted(stats)))
        return False

    out = refit.refit_levels(ctx, ref, names, fit, requests=requests, ahead=lambda left: len(left))
    assert out is ref and len(ctx.runs) == 1
    assert seen == [(0, [names[0]]), (1, [names[1]]), (2, [names[2]])]

    again_stats = {}

    def fit2(key, stats, graph, level):
        if level.index > 0:
            return False

        def second(got, g):
            again_stats.update(got)
        return refit.Again([WeightLayer(next(n for n in graph.nodes if n.name == names[1]), graph)
                            .stats_request("again")], second)

    ctx.runs.clear()
    refit.refit_levels(ctx, ref, names, fit2, requests=requests)
    assert len(ctx.runs) == 4 and "again" in ctx.runs[1] and again_stats["again"].n == 100


def test_shared_levels_put_a_shared_layer_at_its_first_reader():
    ref = _chain(2)
    graph = import_graph(ref)
    g = [n.name for n in graph.nodes if n.op == "Gemm"]
    assert refit.refit_order(graph, g) == [[g[0]], [g[1]], [g[2]]]
    assert refit.shared_levels(graph, {"a": [g[1], g[2]], "b": [g[0]]}) == [["b"], ["a"]]
