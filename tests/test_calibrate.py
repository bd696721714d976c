"""Calibration data sources and the API's ways of passing data."""

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, conv_bn_net

from onnxshrink import Result, shrink
from onnxshrink.calibrate import load_data, split_holdout
from onnxshrink.errors import CalibrationError


@pytest.fixture
def model():
    return conv_bn_net()


@pytest.fixture
def x(rng):
    return rng.standard_normal((30, 3, 8, 8)).astype(np.float32)


def test_npz_keyed_unnamed_and_npy(tmp_path, model, x):
    np.savez(tmp_path / "keyed.npz", input=x)
    np.savez(tmp_path / "unnamed.npz", x)
    np.save(tmp_path / "a.npy", x.astype(np.float64))  # float64 is cast to the model's float32
    for f in ("keyed.npz", "unnamed.npz", "a.npy"):
        src = load_data(str(tmp_path / f), model)
        assert src.n == 30
        batch = next(src.batches(8))
        assert batch["input"].dtype == np.float32 and batch["input"].shape == (8, 3, 8, 8)
        np.testing.assert_allclose(batch["input"], x[:8], rtol=1e-6)


def test_iterable_and_reader_and_holdout(model, x):
    feeds = [{"input": x[i:i + 10]} for i in range(0, 30, 10)]
    src = load_data(iter(feeds), model)
    assert src.n == 30

    class Reader:  # the onnxruntime CalibrationDataReader protocol
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)
    assert load_data(Reader(), model).n == 30
    fit, val = split_holdout(src, 0.2)   # held out by feed: the last of the three feeds
    assert (fit.n, val.n, fit.units(), val.units()) == (20, 10, 2, 1)
    np.testing.assert_array_equal(next(val.batches(64))["input"], x[20:])
    src.close()
    stacked = load_data({"input": x}, model)   # one stacked array: held out by sample, spread over it
    fit, val = split_holdout(stacked, 0.2)
    assert (fit.n, val.n) == (24, 6)
    held = [4, 9, 14, 19, 24, 29]   # one at the end of each sixth (runs of one: six held, up to eight runs)
    np.testing.assert_array_equal(val.take(slice(0, 6))["input"], x[held])
    np.testing.assert_array_equal(fit.take(slice(0, 24))["input"], np.delete(x, held, axis=0))
    # the batches and the comparison's sample indices come from the whole data
    assert [int(i) for _, _, ids in val.validation_batches(4) for i in ids] == held
    assert np.array_equal(next(val.subset(2, 4).batches(8))["input"], x[[14, 19]])


def test_held_out_units_are_runs_spread_over_the_data():
    from onnxshrink.calibrate import held_out_units
    # 150 units sorted by class (75 and 75): 30 held out in 8 runs, from both halves
    h = held_out_units(150, 30)
    assert len(h) == len(set(h)) == 30 and 14 <= (h < 75).sum() <= 16
    runs = np.split(h, np.flatnonzero(np.diff(h) > 1) + 1)
    assert len(runs) == 8 and all(3 <= len(r) <= 4 for r in runs)
    assert list(held_out_units(10, 2)) == [4, 9] and list(held_out_units(5, 1)) == [4]
    assert list(held_out_units(8, 8)) == list(range(8)) and list(held_out_units(8, 0)) == []


def test_image_folder(tmp_path, rng):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    src = load_data(str(folder), conv_bn_net(), {"image_size": (8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    batch = next(src.batches(4))["input"]
    assert batch.shape == (4, 3, 8, 8) and batch.dtype == np.float32
    assert -2.01 <= batch.min() and batch.max() <= 2.01
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match="cannot read image"):   # found while the data is checked
        load_data(str(folder), conv_bn_net(), {"image_size": (8, 8)})


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 3, 8, 8), np.float32), "zero samples"),
    (np.full((4, 3, 8, 8), np.nan, np.float32), "NaN"),
    (np.zeros((4, 3, 8), np.float32), "rank"),
    (np.zeros((4, 3, 8, 8), np.int64), "dtype"),
])
def test_bad_arrays(bad, match, model):
    with pytest.raises(CalibrationError, match=match):
        load_data(bad, model)


def test_api_result_save_and_report(tmp_path, model, x):
    res = shrink(model, passes=["foldbn"], calibration={"input": x})
    assert isinstance(res, Result) and isinstance(res.model, onnx.ModelProto)
    assert set(res.report) >= {"before", "after", "passes", "validation"}
    assert res.report["validation"]["samples"] == 6  # the last 20% held out
    assert set(res.report["validation"]["outputs"]["logits"]) >= {"max_abs", "rel_l2", "cosine", "top1_agreement"}
    res.save(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


@pytest.mark.parametrize("pass_name", ["foldbn", "pfa"])
def test_model_with_fixed_batch_dim(pass_name, rng):
    """input(1,3,8,8) -> Conv -> BN -> Relu -> Conv -> y: exported with batch 1, run one sample at a time"""
    b = GraphBuilder(3)
    x = b.input("input", [1, 3, 8, 8])
    b.conv(b.relu(b.bn(b.conv(x, 3, 4), 4)), 4, 4, out="y")
    b.output("y")
    r = shrink(b.model(), pass_name, calibration=rng.standard_normal((10, 3, 8, 8)).astype(np.float32), force=True)
    assert r.report["validation"]["samples"] == 2 and r.report["validation"]["outputs"]["y"]["cosine"] > 0.9


def test_fixed_batch_larger_than_the_data(rng):
    b = GraphBuilder(3)
    b.conv(b.input("input", [4, 3, 8, 8]), 3, 4, out="y")
    b.output("y")
    with pytest.raises(CalibrationError, match="batch of 4"):
        load_data(rng.standard_normal((3, 3, 8, 8)).astype(np.float32), b.model())


def test_constant_node_weights_get_unused_names(rng):
    """input -> Conv(W from a Constant node 'w', whose '_const' name is taken) -> y"""
    from graphs import GraphBuilder
    from onnx import helper, numpy_helper

    from onnxshrink.graph import normalize
    b = GraphBuilder()
    x = b.input("input", ["batch", 2, 5, 5])
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b.nodes.append(helper.make_node("Constant", [], ["w"], name="wconst", value=numpy_helper.from_array(w)))
    b.nodes.append(helper.make_node("Identity", [x], ["w_const"], name="taken"))
    h = b.node("Conv", ["w_const", "w"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.node("Relu", [h], out="y")
    b.output("y")
    m = b.model()
    n = normalize(m)
    assert [t.name for t in n.graph.initializer] == ["w_const_1"]
    feeds = {"input": rng.standard_normal((2, 2, 5, 5)).astype(np.float32)}
    from graphs import assert_close
    assert_close(m, n, feeds)


@pytest.mark.parametrize("auto,stride,k,spatial", [("SAME_UPPER", 1, 3, 9), ("SAME_LOWER", 1, 4, 9),
                                                   ("SAME_UPPER", 2, 3, 9), ("SAME_LOWER", 2, 4, 8),
                                                   ("VALID", 2, 3, 9), ("SAME_UPPER", 2, 3, "w")])
def test_auto_pad_becomes_explicit_pads(auto, stride, k, spatial, rng):
    """input(N,2,9,spatial) -> Conv(auto_pad, stride) -> Relu -> Conv -> y"""
    from graphs import GraphBuilder, assert_close

    from onnxshrink.graph import normalize
    b = GraphBuilder()
    x = b.input("input", ["batch", 2, 9, spatial])
    w = b.const(rng.standard_normal((4, 2, k, k)).astype(np.float32))
    h = b.relu(b.node("Conv", [x, w], auto_pad=auto, strides=[stride, stride], kernel_shape=[k, k]))
    b.conv(h, 4, 3, k=1, out="y")
    b.output("y")
    m = b.model()
    n = normalize(m)
    conv = next(node for node in n.graph.node if node.op_type == "Conv")
    attrs = {a.name for a in conv.attribute}
    static = spatial != "w" or stride == 1
    assert ("auto_pad" not in attrs and "pads" in attrs) == static
    feeds = {"input": rng.standard_normal((3, 2, 9, 9 if spatial == "w" else spatial)).astype(np.float32)}
    assert_close(m, n, feeds, rtol=1e-6, atol=1e-6)


def test_unnamed_nodes_get_names(rng):
    from graphs import conv_bn_net

    from onnxshrink.graph import normalize
    m = conv_bn_net()
    for node in m.graph.node:
        node.name = ""
    names = [node.name for node in normalize(m).graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_upstream_of_runs_only_what_the_tensors_need(rng):
    """``upstream_of`` keeps the nodes a fetched tensor depends on (an If body's captured outer
    tensor included) and gives the values the whole model gives; the calibration run uses it.

        x ─ MatMul(w1) ─ h ─ Relu ─ r ─ MatMul(w2) ─ y
                          └─ ReduceMax ─ > 0 ─ If(then: h + r_outer, else: h) ─ z
    """
    from onnx import TensorProto, helper, numpy_helper

    from onnxshrink.calibrate import DataSource, collect, session, upstream_of, with_outputs
    from onnxshrink.stats import RowSample

    w1 = numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w2")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")

    def body(name, out):
        nodes = [helper.make_node("Add", ["h", "r"], [out])] if out.startswith("t") else \
            [helper.make_node("Identity", ["h"], [out])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]),
             helper.make_node("ReduceMax", ["h"], ["m"], keepdims=0), helper.make_node("Greater", ["m", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["z"], then_branch=body("then", "t_out"), else_branch=body("else", "e_out"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w1, w2, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": rng.standard_normal((5, 6)).astype(np.float32)}
    for names, kept in ((["h"], 1), (["r"], 2), (["z"], 5), (["y", "h"], 3)):
        small = upstream_of(model, names)
        assert len(small.graph.node) == kept and [o.name for o in small.graph.output] == names
        assert {t.name for t in small.graph.initializer} <= {"w1", "w2", "zero"}
        got = session(small).run(names, feed)
        want = session(with_outputs(model, names)).run(names, feed)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert len(model.graph.node) == 6 and [o.name for o in model.graph.output] == ["y", "z"]   # input untouched
    acc = collect(DataSource({"x": feed["x"]}), [RowSample("k", "h", "r", 100, 100)], model)
    x_rows, y_rows = RowSample.rows(acc["k"])
    np.testing.assert_array_equal(y_rows, np.maximum(x_rows, 0))


def test_runs_compute_only_what_the_requested_tensors_need(model, x):
    """A run for an early tensor keeps only the nodes it is computed from (ONNX Runtime would run
    the whole graph), every graph input stays, and the values are those of the whole model."""
    from onnxshrink.calibrate import session, upstream_of, with_outputs
    early = model.graph.node[0].output[0]
    small = upstream_of(model, [early])
    assert [o.name for o in small.graph.output] == [early]
    assert len(small.graph.node) == 1 < len(model.graph.node)
    assert [i.name for i in small.graph.input] == [i.name for i in model.graph.input]
    kept = {t.name for t in small.graph.initializer}
    assert kept == {i for i in small.graph.node[0].input if i in {t.name for t in model.graph.initializer}}
    feed = {"input": x}
    whole = session(with_outputs(model, [early])).run([early], feed)[0]
    np.testing.assert_array_equal(session(small).run([early], feed)[0], whole)
    last = model.graph.output[0].name   # the graph's own output: nothing to cut
    assert len(upstream_of(model, [last]).graph.node) == len(model.graph.node)
    assert len(model.graph.node) > 1 and model.graph.output[0].name == last   # the input is unchanged
