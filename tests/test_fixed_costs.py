"""The pipeline's fixed costs: work that does not depend on the calibration data done once, with
the same answers as doing it again (model sizes without serializing the weights, static shapes
kept by what they are computed from, a refit's initializer digests carried over, sessions of
the same model shared)."""

import numpy as np
import onnx
from graphs import GraphBuilder, conv_bn_net, gemm_chain

from onnxshrink import calibrate
from onnxshrink import graph as graph_mod
from onnxshrink.calibrate import RunCache, keep_session, keeping_sessions, session
from onnxshrink.cost import model_bytes
from onnxshrink.graph import export_model, import_graph, infer_shapes
from onnxshrink.model_io import serialized_size


def _mlp(seed=0, widths=(8, 300, 16, 4)):
    return gemm_chain(seed, widths)


def test_serialized_size_is_the_protobuf_size():
    for model in (conv_bn_net(0), _mlp(), _mlp(1, (4, 3000, 2))):   # the last: lengths of 2- and 3-byte varints
        assert serialized_size(model) == model.ByteSize() == len(model.SerializeToString())
        assert model_bytes(model) == model.ByteSize()
    empty = onnx.ModelProto()
    assert serialized_size(empty) == empty.ByteSize() == 0


def test_infer_shapes_is_kept_by_what_inference_reads(monkeypatch):
    """x(N,8) -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> y: inferred once per structure, dims and
    input shapes; the same structure with other weight values is the same answer."""
    runs = []
    real = graph_mod._static_inference
    monkeypatch.setattr(graph_mod, "_static_inference", lambda m, *a: runs.append(1) or real(m, *a))
    monkeypatch.setattr(graph_mod, "_shapes_memo", type(graph_mod._shapes_memo)())
    model = _with_weight(_mlp(0, (8, 600, 16, 4)), 1, 1.0)   # the 600 x 16 weight: large, read by dims only
    first = infer_shapes(model, {"x": (3, 8)})
    first["x"] = "changed by the caller"
    again = infer_shapes(model, {"x": (3, 8)})
    assert len(runs) == 1 and again["x"] == ((3, 8), np.dtype(np.float32))
    assert infer_shapes(_with_weight(model, 1, 1.5), {"x": (3, 8)}) == again and len(runs) == 1
    assert infer_shapes(_with_weight(model, 2, 1.5), {"x": (3, 8)}) == again and len(runs) == 2   # a small one: read
    other = infer_shapes(model, {"x": (7, 8)})
    assert len(runs) == 3 and other["x"][0] == (7, 8)
    wider = infer_shapes(_mlp(0, (8, 600, 17, 4)), {"x": (3, 8)})
    assert len(runs) == 4 and wider != again
    fresh = graph_mod._inferred(model, graph_mod._without_weight_data(model), {"x": (3, 8)}, None)
    assert set(fresh) == set(again)


def _with_weight(model, i, scale):
    """``model`` with its i-th Gemm's weight scaled (exported from a graph: a new ModelProto)."""
    graph = import_graph(model)
    gemm = [n for n in graph.nodes if n.op == "Gemm"][i]
    gemm.inputs[1].values = gemm.inputs[1].values * np.float32(scale)
    return export_model(graph, like=model)


def test_run_cache_digests_carry_over_equal_initializers():
    """The digests of a candidate computed after its predecessor's are those of a cache that saw
    only the candidate: the unchanged initializers keep theirs, the changed one and everything
    downstream of it get new ones."""
    model = _mlp(0)
    moved = _with_weight(model, 1, 1.5)
    cache = RunCache(1 << 20)
    before = cache.digests(model)
    after = cache.digests(moved)
    assert after == RunCache(1 << 20).digests(moved)
    nodes = [n for n in moved.graph.node]
    first, second = nodes[0].output[0], [n for n in nodes if n.op_type == "Gemm"][1].output[0]
    assert after[first] == before[first] and after[second] != before[second]
    assert cache.digests(model) == before


def test_sessions_of_kept_models_are_made_once(monkeypatch):
    made = []
    real = calibrate._session
    monkeypatch.setattr(calibrate, "_session", lambda m, threads=0: made.append(m) or real(m, threads))
    model, other = _mlp(0), _mlp(1)
    with keeping_sessions():
        keep_session(model, "input")
        a, b = session(model), session(model)
        assert a is b and len(made) == 1
        assert session(other) is not session(other) and len(made) == 3   # not kept: one each time
        assert session(model, threads=1) is not a and len(made) == 4     # other options: its own
        keep_session(other, "input")                                      # the slot now holds ``other``
        assert session(model) is not a and len(made) == 5
        monkeypatch.setattr(calibrate, "KEEP_SESSION_BYTES", 0)           # too large to keep: slot emptied
        keep_session(other, "input")
        session(other), session(other)
        assert len(made) == 7
    keep_session(model, "input")   # outside a block: nothing kept
    session(model), session(model)
    assert len(made) == 9


def test_shrink_makes_one_session_of_its_input_and_one_of_its_output(monkeypatch, rng):
    """The batching probe and the validation share the input's session; the load check and the
    validation share the output's."""
    from onnxshrink import shrink
    made = []
    real = calibrate._session
    monkeypatch.setattr(calibrate, "_session", lambda m, threads=0: made.append(m) or real(m, threads))
    b = GraphBuilder()
    x = b.input("x", ["batch", 16])
    h = b.relu(b.gemm(x, 16, 32))
    b.gemm(h, 32, 4, out="y")
    b.output("y")
    model = b.model()
    calib = rng.standard_normal((64, 16)).astype(np.float32)
    res = shrink(model, ["pfa"], calibration=calib, quiet=True, force=True, options={"pfa": {"energy": 0.9}})
    out = res.model.SerializeToString()
    whole = [m for m in made if len(m.graph.node) == len(model.graph.node) and len(m.graph.output) == 1]
    by_bytes = {}
    for m in whole:
        by_bytes.setdefault(m.SerializeToString(), []).append(m)
    assert len(by_bytes.get(out, [])) == 1, "the output's session was made more than once"
    assert max(len(v) for k, v in by_bytes.items() if k != out) <= 2   # the input: the load check + one


def test_ordered_map_keeps_its_workers_across_calls():
    """The pool of a worker count is made once: later calls run on the same threads."""
    import threading

    from onnxshrink import parallel
    seen = []

    def fn(i):
        np.linalg.qr(np.ones((40, 40)) + i)
        seen.append(threading.current_thread())   # the objects: an ident can be reused by a new thread
        return i

    with parallel.fitting(2):
        for _ in range(5):
            assert parallel.ordered_map(fn, range(8)) == list(range(8))
    assert 1 <= len({id(t) for t in seen}) <= 2 and len(seen) == 40


def test_normalize_infers_shapes_without_the_weights_and_writes_the_same_model(monkeypatch):
    """x(N,8) -> Gemm(8x600) -> Relu -> Gemm(600x16) -> Relu -> Gemm -> y: the large weights stand in
    as inputs for inference; the normalised model is the bytes full inference gives."""
    from onnx import shape_inference

    from onnxshrink.graph import normalize
    model = _mlp(0, (8, 600, 16, 4))
    light = normalize(model)
    assert len(light.graph.value_info) >= 4   # the intermediate shapes are there
    monkeypatch.setattr(graph_mod, "_with_shapes", lambda m: shape_inference.infer_shapes(m, data_prop=True))
    assert normalize(model).SerializeToString() == light.SerializeToString()


def test_pfa_statistics_run_fetches_the_refits_targets(monkeypatch, rng):
    """x(N,16) -> Gemm(16->48) -> Relu -> Gemm(48->48) -> Relu -> Gemm(48->4) -> y, pfa at half the
    params: the statistics run of the reference also fetches the targets of the consumers' refit
    (their outputs), so the refit runs no reference model of its own: one run of the input model
    over the data, not one more (or, without the cache, one more per refit level); the model written is the same as with the refit's own reference run
    (the reference cache off)."""
    from onnxshrink import shrink
    model = gemm_chain(3, (16, 48, 48, 4))
    calib = rng.standard_normal((96, 16)).astype(np.float32)
    runs = []
    real = calibrate._Runner.__init__

    def counting(self, m, names):
        real(self, m, names)
        runs.append((m, list(names)))
    monkeypatch.setattr(calibrate._Runner, "__init__", counting)

    def run():
        runs.clear()
        res = shrink(model, ["pfa"], calibration=calib, quiet=True, force=True, target_params=0.5)
        of_input = [names for m, names in runs if len(m.graph.node) == len(model.graph.node)
                    and m.graph.initializer[0] == model.graph.initializer[0]]   # the input, not a pruned copy
        return res, of_input

    res, of_input = run()
    rep = res.report["passes"][0]
    assert rep["changed"] and rep["reference_cache"]["runs"] == 1
    assert len(of_input) == 1, of_input                          # the statistics run only
    monkeypatch.setenv(calibrate.CACHE_ENV, "0")
    off, of_input_off = run()
    assert len(of_input_off) == 3                                # statistics, then each refit level's targets
    assert off.model.SerializeToString() == res.model.SerializeToString()

