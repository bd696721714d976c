"""refit.refit_levels: the sequential refit loop, on a chain of Gemms whose weights were disturbed."""

import contextlib

import numpy as np
from graphs import GraphBuilder, disturbed_gemms, gemm_chain, refit_gemms, run

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
    return gemm_chain(seed, (8, 8, 8, 4))


def _disturbed(model, rng):
    return disturbed_gemms(model, rng)


def test_refit_levels_restores_the_reference(rng):
    ref = _chain(0)
    bad = _disturbed(ref, rng)
    data = DataSource({"x": rng.standard_normal((300, 8)).astype(np.float32)})
    ctx = Ctx(ref, data)
    out = refit_gemms(ctx, ref, bad, 1e-9)
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


def _deep_chain(seed, n=5, matmul=False):
    """x(N,8) -> [Gemm|MatMul](8->8) -> Relu -> ... (n layers) -> y"""
    b = GraphBuilder(seed)
    h = b.input("x", ["N", 8])
    for i in range(n):
        if matmul:
            h = b.node("MatMul", [h, b.const(b.rng.standard_normal((8, 8)).astype(np.float32) * 0.4)],
                       out="y" if i == n - 1 else None)
        else:
            h = b.gemm(h, 8, 8, out="y" if i == n - 1 else None)
        if i < n - 1:
            h = b.relu(h)
    b.output("y")
    return b.model()


def _loop(ctx, bad, names, reimport, bias=True):
    def requests(key, graph):
        return [WeightLayer(next(n for n in graph.nodes if n.name == key), graph).stats_request(key)]

    def solve(key, stats, graph, level):
        return ridge_solve(stats[key], 1e-6)

    def write(key, wb, graph, level):
        WeightLayer(next(n for n in graph.nodes if n.name == key), graph).write(wb[0], wb[1] if bias else None)

    return refit.refit_levels(ctx, bad, names, solve, write, requests=requests, desc="t", reimport=reimport)


def test_levels_that_change_weights_only_are_patched_not_exported(rng, monkeypatch):
    """A level whose edits replace weights only gives its model by replacing those initializers in
    the last one (no export of the whole graph, no re-import); the model returned is exported, and
    equals, byte for byte, the one of exporting (and re-importing) at every level."""
    ref = _deep_chain(5)
    bad = _disturbed(ref, rng)
    data = DataSource({"x": rng.standard_normal((120, 8)).astype(np.float32)})
    names = [n.name for n in import_graph(ref).nodes if n.op == "Gemm"]
    exports = []
    real = refit.export_model
    monkeypatch.setattr(refit, "export_model", lambda *a, **k: exports.append(1) or real(*a, **k))
    outs = {}
    for reimport in (True, False):
        exports.clear()
        outs[reimport] = _loop(Ctx(ref, data), bad, names, reimport)
        assert len(exports) == 2            # the first level's and the last model; levels 2-5 patched
    every = {}

    def always(graph, current, like, export_copy, sync):
        return real(graph.copy() if export_copy else graph, like=like), None
    monkeypatch.setattr(refit, "_export", always)
    for reimport in (True, False):
        exports.clear()
        every[reimport] = _loop(Ctx(ref, data), bad, names, reimport)
    for reimport in (True, False):
        assert outs[reimport].SerializeToString() == every[reimport].SerializeToString()
    feed = {"x": rng.standard_normal((40, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(outs[True], feed)[0], run(ref, feed)[0], atol=1e-3)


def test_a_level_that_adds_nodes_is_exported(rng, monkeypatch):
    """MatMuls without a bias Add: writing a bias adds one (the structure changes), so every
    level is exported; the result is that of exporting at every level."""
    ref = _deep_chain(6, n=3, matmul=True)
    graph = import_graph(ref)
    for n in graph.nodes:
        if n.op == "MatMul":
            layer = WeightLayer(n, graph)
            layer.write(layer.matrix() + 0.3 * rng.standard_normal((8, 8)))
    from onnxshrink.graph import export_model
    bad = export_model(graph, like=ref)
    data = DataSource({"x": rng.standard_normal((120, 8)).astype(np.float32)})
    names = [n.name for n in import_graph(ref).nodes if n.op == "MatMul"]
    exports = []
    real = refit.export_model
    monkeypatch.setattr(refit, "export_model", lambda *a, **k: exports.append(1) or real(*a, **k))
    out = _loop(Ctx(ref, data), bad, names, True)
    assert len(exports) == 3
    assert sum(n.op_type == "Add" for n in out.graph.node) == 3
    monkeypatch.setattr(refit, "_export", lambda g, c, like, e, s: (real(g, like=like), None))
    assert out.SerializeToString() == _loop(Ctx(ref, data), bad, names, True).SerializeToString()
