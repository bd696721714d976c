"""calibrate.RunCache: a refit's candidate models run incrementally. Tensors upstream of what a
model changed are fed from the last run's frontier instead of computed again; anything downstream
of a changed weight is computed again; the statistics are those of a whole run."""

import numpy as np
from graphs import disturbed_gemms, gemm_chain, refit_gemms

from onnxshrink import calibrate
from onnxshrink.calibrate import DataSource, RunCache, collect
from onnxshrink.graph import export_model, import_graph
from onnxshrink.layers import WeightLayer
from onnxshrink.pipeline import PassContext


def _chain(seed):
    """x(N,8) -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> y"""
    return gemm_chain(seed, (8, 16, 16, 16, 4))


def _gemms(model):
    graph = import_graph(model)
    return graph, [n for n in graph.nodes if n.op == "Gemm"]


def _request(model, i):
    graph, gemms = _gemms(model)
    return WeightLayer(gemms[i], graph).stats_request(gemms[i].name)


def _moved(model, i, rng):
    """``model`` with the weight of its i-th Gemm moved."""
    graph, gemms = _gemms(model)
    layer = WeightLayer(gemms[i], graph)
    layer.write(layer.matrix() + rng.standard_normal((layer.d_in, layer.d_out)), layer.bias())
    return export_model(graph, like=model)


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].n == b[k].n
        for f in ("sum_y", "xy", "yy"):
            np.testing.assert_array_equal(getattr(a[k], f), getattr(b[k], f))
        np.testing.assert_array_equal(a[k].x.outer, b[k].x.outer)


class _Sessions:
    """Records the ops of every model a session is made for."""

    def __init__(self, monkeypatch):
        self.models = []
        real = calibrate.session

        def spy(model, threads=0):
            self.models.append([n.name for n in model.graph.node])
            return real(model, threads)
        monkeypatch.setattr(calibrate, "session", spy)


def test_candidates_run_from_the_frontier_and_give_whole_run_statistics(rng, monkeypatch):
    ref = _chain(0)
    data = DataSource({"x": rng.standard_normal((100, 8)).astype(np.float32)})
    runs = RunCache(1 << 30)
    seen = _Sessions(monkeypatch)
    _, gemms = _gemms(ref)
    names = [g.name for g in gemms]
    m0 = disturbed_gemms(ref, rng)
    got = collect(data, [_request(m0, 1)], m0, ref, batch_size=32, runs=runs)
    _same(collect(data, [_request(m0, 1)], m0, ref, batch_size=32), got)
    first = seen.models[0]
    assert names[0] in first and names[1] not in first     # the run stops at the second Gemm's input
    assert len(runs.held) == 1 and len(next(iter(runs.held.values()))[1]) == 4   # its input, 4 batches
    # the second Gemm changed: the third's inputs are computed from the second's inputs, held
    m1 = _moved(m0, 1, rng)
    seen.models.clear()
    got = collect(data, [_request(m1, 2)], m1, ref, batch_size=32, runs=runs)
    assert names[0] not in seen.models[0] and names[1] in seen.models[0]
    assert runs.served == 1
    seen.models.clear()
    _same(collect(data, [_request(m1, 2)], m1, ref, batch_size=32), got)
    assert names[0] in seen.models[0]                          # a whole run, for comparison
    # the first Gemm changed: nothing held is valid for this model, the run starts at the input
    m2 = _moved(m1, 0, rng)
    seen.models.clear()
    got = collect(data, [_request(m2, 3)], m2, ref, batch_size=32, runs=runs)
    assert names[0] in seen.models[0]
    _same(collect(data, [_request(m2, 3)], m2, ref, batch_size=32), got)
    # an unchanged model asking again: served, no session of it (one of the reference, for y)
    seen.models.clear()
    served = runs.served
    again = collect(data, [_request(m2, 3)], m2, ref, batch_size=32, runs=runs)
    _same(got, again)
    assert len(seen.models) == 1 and runs.served == served + 1


def test_cap_bounds_what_is_held_never_the_result(rng):
    ref = _chain(1)
    data = DataSource({"x": rng.standard_normal((100, 8)).astype(np.float32)})
    m0 = disturbed_gemms(ref, rng)
    runs = RunCache(3000)   # less than one 16-wide tensor over 100 samples (6400 bytes)
    got = collect(data, [_request(m0, 2)], m0, ref, batch_size=32, runs=runs)
    assert runs.nbytes <= runs.cap and not runs.held
    m1 = _moved(m0, 2, rng)
    _same(collect(data, [_request(m1, 3)], m1, ref, batch_size=32),
          collect(data, [_request(m1, 3)], m1, ref, batch_size=32, runs=runs))
    assert got


def test_refit_levels_gives_the_same_model_incrementally(rng):
    """A refit through a PassContext (incremental runs) writes the model, byte for byte, that the
    same refit with whole runs writes (a Gemm chain: no fusion that fetching could change)."""
    ref = _chain(2)
    bad = disturbed_gemms(ref, rng)
    data = DataSource({"x": rng.standard_normal((120, 8)).astype(np.float32)})

    def ctx():
        return PassContext(data=data, reference=ref, original=ref, batch_size=32)

    c = ctx()
    inc = refit_gemms(c, ref, bad, 1e-3)
    assert c.calibration_runs >= 3
    plain = ctx()
    plain.incremental = None     # no scope: every level runs its model from the inputs
    whole = refit_gemms(plain, ref, bad, 1e-3)
    assert inc.SerializeToString() == whole.SerializeToString()


def test_digests_follow_how_a_tensor_is_computed():
    """A tensor's digest changes with any node or initializer upstream of it, not with others;
    a random draw and what is computed from it have none (never served)."""
    from onnx import TensorProto, helper, numpy_helper
    def model(bias):
        nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
                 helper.make_node("Add", ["r", "b"], ["rb"], name="add"),
                 helper.make_node("RandomUniformLike", ["x"], ["u"], name="draw"),
                 helper.make_node("Mul", ["r", "u"], ["y"], name="mul")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("rb", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.full(2, bias, np.float32), "b")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    a, b = RunCache(1).digests(model(1.0)), RunCache(1).digests(model(2.0))
    assert a["r"] == b["r"] and a["rb"] != b["rb"] and a["r"] != a["rb"]
    assert a["u"] is None and a["y"] is None


def _resized(rng):
    """x(N,2,4,4) → Conv A → t; sizes = Concat(Shape(t)[:2], [8, 8]); Resize(t, sizes) → Conv C →
    Resize(·, sizes) → Conv D → y: ``sizes``, an int64 tensor computed early, is read late."""
    from onnx import TensorProto, helper, numpy_helper

    def w(name):
        return numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), name)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["t"], name="A"),
        helper.make_node("Shape", ["t"], ["shape"], name="S"),
        helper.make_node("Slice", ["shape", "zero", "two"], ["nc"], name="L"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0, name="K"),
        helper.make_node("Resize", ["t", "", "", "sizes"], ["v"], mode="nearest", name="R1"),
        helper.make_node("Conv", ["v", "wc"], ["u"], name="C"),
        helper.make_node("Resize", ["u", "", "", "sizes"], ["r"], mode="nearest", name="R2"),
        helper.make_node("Conv", ["r", "wd"], ["y"], name="D"),
    ]
    inits = [w("wa"), w("wc"), w("wd"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([8, 8], np.int64), "hw")]
    g = helper.make_graph(nodes, "resized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_tensors_are_recomputed_not_fed(rng):
    """A shape tensor fed as an input hides its values from ONNX Runtime's shape inference, which
    then refuses a Resize reading it as `sizes` (a ViT's positional-table interpolation): integer
    tensors at the frontier are not kept; the float ones are, and the statistics are a whole run's."""
    ref = _resized(rng)
    data = DataSource({"x": rng.standard_normal((40, 2, 4, 4)).astype(np.float32)})

    def request(model, name):
        graph = import_graph(model)
        node = next(n for n in graph.nodes if n.name == name)
        return WeightLayer(node, graph).stats_request(name)

    def moved(model, name):
        graph = import_graph(model)
        layer = WeightLayer(next(n for n in graph.nodes if n.name == name), graph)
        layer.write(layer.matrix() + rng.standard_normal((layer.d_in, layer.d_out)), layer.bias())
        return export_model(graph, like=model)

    runs = RunCache(1 << 30)
    m0 = moved(ref, "A")
    collect(data, [request(m0, "C")], m0, ref, batch_size=16, runs=runs)
    assert "v" in runs.held and "sizes" not in runs.held and "shape" not in runs.held
    assert "sizes" in runs.unkept and "v" not in runs.unkept   # seen once: out of later frontiers
    m1 = moved(m0, "C")
    assert "sizes" not in runs.plan(m1, ["r"])[1]
    got = collect(data, [request(m1, "D")], m1, ref, batch_size=16, runs=runs)
    assert runs.served >= 1
    want = collect(data, [request(m1, "D")], m1, ref, batch_size=16)
    for k in want:
        np.testing.assert_allclose(got[k].x.outer, want[k].x.outer, rtol=1e-6)
        np.testing.assert_allclose(got[k].xy, want[k].xy, rtol=1e-6)
