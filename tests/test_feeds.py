"""Data as a sequence of feeds of any shapes: images of different sizes, sequences of different
lengths, scalar and state inputs that pass through; .npz folders, generators; shapes from
running where static inference fails; honest FLOPs; degenerate data refused."""

import glob
import os
import tempfile

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, run
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import shrink
from onnxshrink.calibrate import FeedSource, load_data
from onnxshrink.cli import main
from onnxshrink.errors import CalibrationError, UsageError


def dynamic_cnn(seed=0):
    """input(N,3,H,W) -> Conv3x3 -> Relu -> Conv3x3 -> Relu -> GAP -> Flatten -> Gemm -> logits (H, W dynamic)"""
    b = GraphBuilder(seed)
    x = b.input("input", ["N", 3, "H", "W"])
    h = b.relu(b.conv(x, 3, 8))
    h = b.relu(b.conv(h, 8, 16, stride=2))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    b.gemm(h, 16, 10, out="logits")
    b.output("logits", ["N", 10])
    return b.model()


def seq_model(seed=0):
    """x(N,T,16) -> MatMul 16x128 -> Relu -> MatMul 128x16 -> + b -> ReduceMean over T -> y(N,16) (T dynamic)"""
    b = GraphBuilder(seed)
    x = b.input("x", ["N", "T", 16])
    h = b.relu(b.matmul(x, 16, 128))
    h = b.node("Add", [b.matmul(h, 128, 16), b.const(np.full(16, 0.1, np.float32))])
    b.node("ReduceMean", [h], out="y", axes=[1], keepdims=0)
    b.output("y", ["N", 16])
    return b.model()


def state_model(seed=0):
    """x(B,8) -> MatMul 8x32 -> Relu -> MatMul 32x8 -> + state[0] (state: 2,B,8) -> * rate (scalar) -> y"""
    b = GraphBuilder(seed)
    x = b.input("x", ["B", 8])
    st = b.input("state", [2, "B", 8])
    rate = b.input("rate", [])
    h = b.matmul(b.relu(b.matmul(x, 8, 32)), 32, 8)
    s0 = b.node("Gather", [st, b.const(np.array(0, np.int64))], axis=0)
    b.node("Mul", [b.node("Add", [h, s0]), rate], out="y")
    b.output("y", ["B", 8])
    return b.model()


def reshape_model(seed=0):
    """x(N,T,16) -> Reshape(x, Cast(Cast(Shape(x), float) * 1 + 0·max(x), int64)) -> MatMul 16x32 -> Relu
    -> MatMul 32x16 -> y

    The Reshape target reads the values of x (times 0): neither onnx's static shape inference nor
    folding the shape subgraph resolves it, so every shape after it is unknown until the data runs
    through."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.ones(3, np.float32), "one"), numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array((rng.standard_normal((16, 32)) / 4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((32, 16)) / 6).astype(np.float32), "w2")]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="cast1"),
             helper.make_node("Mul", ["sf", "one"], ["sf1"], name="mul"),
             helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0, name="xmax"),
             helper.make_node("Mul", ["xmax", "zero"], ["xzero"], name="xzero"),
             helper.make_node("Add", ["sf1", "xzero"], ["sf2"], name="add"),
             helper.make_node("Cast", ["sf2"], ["s2"], to=TensorProto.INT64, name="cast2"),
             helper.make_node("Reshape", ["x", "s2"], ["h"], name="reshape"),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


LOWRANK = {"lowrank": {"lowrank": {"rank_multiple": 1, "energy": 0.6}}, "pfa": {"pfa": {"energy": 0.8}}}


def image_feeds(rng, sizes):
    return [{"input": rng.standard_normal((1, 3, h, w)).astype(np.float32)} for h, w in sizes]


SIZES = [(16, 24), (24, 16), (16, 16), (32, 24), (20, 28), (16, 24), (28, 20), (24, 24), (16, 32), (32, 32)]


def seq_feeds(rng, n=10, batch=3):
    return [{"x": rng.standard_normal((batch, 4 + 3 * (i % 4), 16)).astype(np.float32)} for i in range(n)]


def state_feeds(rng, n=10):
    return [{"x": rng.standard_normal((b, 8)).astype(np.float32),
             "state": 0.1 * rng.standard_normal((2, b, 8)).astype(np.float32),
             "rate": np.array(1.0 + 0.1 * i, np.float32)} for i, b in enumerate([2, 3, 1, 4, 2, 3, 2, 1, 4, 3][:n])]


# ----------------------------------------------------------------------------- sources
def test_feeds_of_different_shapes_are_kept_and_batched_by_shape(rng):
    src = load_data(image_feeds(rng, SIZES), dynamic_cnn())
    assert isinstance(src, FeedSource) and src.n == 10 and src.units() == 10
    batches = list(src.batches(4))
    # consecutive feeds of equal shapes merge (the 16x24 pair is not consecutive)
    assert [b["input"].shape[0] for b in batches] == [1] * 10
    assert src.count_batches(4) == len(batches)
    same = load_data(image_feeds(rng, [(16, 16)] * 7), dynamic_cnn())
    assert [b["input"].shape for b in same.batches(3)] == [(3, 3, 16, 16), (3, 3, 16, 16), (1, 3, 16, 16)]
    sigs = src.signatures()
    assert sum(s["samples"] for s in sigs) == 10 and len(sigs) == 9   # (16, 24) twice


def test_pass_through_inputs_are_not_split_or_stacked(rng):
    model = state_model()
    feeds = state_feeds(rng)
    src = load_data(feeds, model)
    assert src.roles == {"x": "batch", "state": "pass", "rate": "pass"}
    batches = list(src.batches(64))
    assert len(batches) == 10 and [b["state"].shape for b in batches] == [f["state"].shape for f in feeds]
    assert src.n == sum(len(f["x"]) for f in feeds)
    assert all(b["rate"].shape == () for b in batches)


def test_generator_is_materialised_and_removed(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    feeds = seq_feeds(rng)
    res = shrink(seq_model(), "lowrank", calibration=(f for f in feeds), force=True)
    assert res.report["validation"]["feeds"] == 2 and res.report["validation"]["samples"] == 6
    assert glob.glob(str(tmp_path / "onnxshrink-feeds-*")) == []   # removed afterwards
    from onnxshrink.calibrate import split_holdout
    fit, val = split_holdout(load_data((f for f in feeds), seq_model()), 0.2)
    assert len(glob.glob(str(tmp_path / "onnxshrink-feeds-*"))) == 1
    fit.close()   # what shrink does when it ends: the parts remove the whole folder
    assert glob.glob(str(tmp_path / "onnxshrink-feeds-*")) == [] and val.n == 6
    src = load_data((f for f in feeds), seq_model())
    folder = src.parent.owner
    assert len(os.listdir(folder)) == 10 and src.n == 30
    src.close()
    assert not os.path.exists(folder)


def test_npz_folder_through_the_cli(rng, tmp_path):
    model = seq_model()
    onnx.save(model, tmp_path / "m.onnx")
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, f in enumerate(seq_feeds(rng)):
        np.savez(folder / f"{i:02d}.npz", **f)
    rc = main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--passes", "lowrank", "--calibration-data",
               str(folder), "--report", str(tmp_path / "r.json"), "--quiet", "--force"])
    import json
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and rep["validation"]["feeds"] == 2 and rep["validation"]["samples"] == 6
    assert sorted({s["inputs"]["x"][1] for s in rep["cost_shapes"]}) == [4, 7, 10, 13]


# ----------------------------------------------------------------------------- passes on varying shapes
@pytest.mark.parametrize("pass_name,opts", [
    ("pfa", {"pfa": {"energy": 0.8}}), ("basisconv", {"basisconv": {"energy": 0.8, "channel_multiple": 1}}),
    ("pq", {}), ("lowrank", {"lowrank": {"conv": True, "energy": 0.8, "rank_multiple": 1}})])
def test_passes_on_images_of_different_sizes(pass_name, opts, rng):
    model = dynamic_cnn()
    # pfa's energy recipe needs more response rows than a group's channels (16): 32 fitting images
    reps = 4 if pass_name == "pfa" else 2
    feeds = image_feeds(rng, SIZES * reps)
    res = shrink(model, pass_name, calibration=feeds, options=opts)
    v = res.report["validation"]
    held = 2 * reps   # 20 % of the feeds
    assert res.report["passes"][0]["changed"], res.report["passes"][0]
    assert v["passed"] and v["feeds"] == held and v["samples"] == held and v["outputs"]["logits"]["cosine"] > 0.99
    from onnxshrink.calibrate import held_out_units   # indices of the whole data's feeds
    assert v["outputs"]["logits"]["worst"]["feed"] in set(held_out_units(len(feeds), held).tolist())
    for f in feeds[:3]:   # the rewritten model runs at every size
        assert run(res.model, f)[0].shape == (1, 10)


@pytest.mark.parametrize("pass_name", ["pfa", "lowrank", "pq"])
def test_passes_on_sequences_of_different_lengths(pass_name, rng):
    res = shrink(seq_model(), pass_name, calibration=seq_feeds(rng, 15), force=True, options=LOWRANK.get(pass_name))
    v = res.report["validation"]
    assert v["feeds"] == 3 and v["samples"] == 9 and v["outputs"]["y"]["cosine"] > 0.5
    assert res.report["passes"][0]["changed"], res.report["passes"][0]


@pytest.mark.parametrize("pass_name", ["pfa", "lowrank"])
def test_scalar_and_state_inputs_pass_through(pass_name, rng):
    # 20 fitting samples are too few for pfa's energy recipe on 32 channels (it keeps them whole):
    # a target's allocation, which fits the consumer, prunes them
    target = {"target_params": 0.7} if pass_name == "pfa" else {}
    res = shrink(state_model(), pass_name, calibration=state_feeds(rng), force=True, options=LOWRANK.get(pass_name),
                 **target)
    v = res.report["validation"]
    assert v["feeds"] == 2 and v["outputs"]["y"]["cosine"] > 0.5
    assert res.report["passes"][0]["changed"]


# ----------------------------------------------------------------------------- shapes from running
def test_static_inference_fails_on_the_reshape_model():
    from onnxshrink.graph import concrete_input_shapes, infer_shapes
    m = reshape_model()
    info = infer_shapes(m, concrete_input_shapes(m, {"x": (5, 16)}))
    assert info["h"][0] is None and info["a"][0] is None


def test_shape_subgraphs_of_constants_and_known_shapes_are_folded_for_inference():
    """A TF-style Pad whose pads are computed from constants, and a Reshape whose target is computed
    from Shape(x) through float: static inference alone leaves both unknown; folded, every shape is
    known without running the model (and the model itself is unchanged)."""
    from onnxshrink.graph import infer_shapes
    inits = [numpy_helper.from_array(np.array([0, 0, 0, 1, 2, 3], np.int64), "p4"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "p_shape"),
             numpy_helper.from_array(np.ones(3, np.float32), "one")]
    nodes = [helper.make_node("Reshape", ["p4", "p_shape"], ["p24"], name="r"),
             helper.make_node("Transpose", ["p24"], ["p42"], perm=[1, 0], name="t"),
             helper.make_node("Reshape", ["p42", "p_flat"], ["pads"], name="r2"),
             helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
             helper.make_node("Shape", ["xp"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="c1"),
             helper.make_node("Mul", ["sf", "one"], ["sf2"], name="mul"),
             helper.make_node("Cast", ["sf2"], ["s2"], to=TensorProto.INT64, name="c2"),
             helper.make_node("Reshape", ["xp", "s2"], ["y"], name="reshape")]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "p_flat"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    before = m.SerializeToString()
    plain = onnx.shape_inference.infer_shapes(m, data_prop=True)
    assert not any(vi.name == "xp" and vi.type.tensor_type.shape.dim for vi in plain.graph.value_info
                   if all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim))
    info = infer_shapes(m, {"x": (1, 3, 5)})
    # pads = Reshape(Reshape(p4, 2x3)ᵀ, -1) = (0, 1, 0, 2, 0, 3): begins (0, 1, 0), ends (2, 0, 3)
    assert info["xp"][0] == (3, 4, 8) and info["y"][0] == (3, 4, 8) and info["s2"][0] == (3,)
    assert m.SerializeToString() == before


@pytest.mark.parametrize("pass_name", ["lowrank", "pfa"])
def test_shapes_from_running_let_passes_act(pass_name, rng):
    m = reshape_model()
    feeds = seq_feeds(rng, 10)
    res = shrink(m, pass_name, calibration=feeds, force=True, options=LOWRANK.get(pass_name))
    rep = res.report["passes"][0]
    assert not any("shape unknown" in s["reason"] for s in rep["skipped"]), rep["skipped"]
    assert any("mm1" in c or "mm2" in c for c in rep["changed"]), rep
    assert res.report["before"]["flops"] > 0 and res.report["after"]["flops"] < res.report["before"]["flops"]


# ----------------------------------------------------------------------------- honest costs
def test_flops_are_counted_at_the_feeds_shapes(rng):
    model = seq_model()
    feeds = seq_feeds(rng, 10)
    res = shrink(model, "foldbn", calibration=feeds, force=True)
    lengths = [f["x"].shape[1] for f in feeds[:8]]   # the fit part: costs use the calibration feeds
    per_sample = [2 * t * 16 * 128 + t * 128 + 2 * t * 128 * 16 + t * 16 + 16 for t in lengths]  # ReduceMean: one per output
    assert res.report["before"]["flops"] == pytest.approx(np.mean(per_sample), abs=1)


def test_flops_target_on_uncountable_model_is_an_error(rng, monkeypatch):
    """Before: a FLOPs target on a model whose FLOPs could not be counted reported reached 0.0, met."""
    from onnxshrink.calibrate import ShapeObserver
    feeds = seq_feeds(rng, 10)
    monkeypatch.setattr(ShapeObserver, "observe", lambda self, m, s: None)   # no shapes from running
    with pytest.raises(UsageError, match="cannot be counted"):
        shrink(reshape_model(), "lowrank", calibration=feeds, target_flops=0.8)
    from onnxshrink.budget import missed, reached
    r = reached({"flops": 0.8}, {"flops": None}, {"flops": None})
    assert r["flops"]["met"] is False and missed(r) is not None


def test_inspect_with_calibration_data_shows_real_shapes(rng, tmp_path, capsys):
    model = dynamic_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, f in enumerate(image_feeds(rng, [(40, 56), (40, 56), (24, 24)])):
        np.savez(folder / f"{i}.npz", **f)
    assert main(["--inspect", str(tmp_path / "m.onnx"), "--calibration-data", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "1x8x40x56" in out and "shapes" in out


# ----------------------------------------------------------------------------- image folders
def test_image_folder_on_dynamic_model_keeps_each_size(rng, tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(50, 70), (100, 60), (33, 33), (200, 100)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    src = load_data(str(folder), dynamic_cnn(), {"max_side": 64, "size_multiple": 16})
    shapes = [b["input"].shape[2:] for b in src.batches(1)]
    assert shapes == [(48, 64), (64, 32), (32, 32), (64, 32)]
    fixed = load_data(str(folder), dynamic_cnn(), {"image_size": (16, 16)})
    assert {b["input"].shape for b in fixed.batches(2)} == {(2, 3, 16, 16)}


def test_image_channel_order_and_scale(rng, tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    px = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(px).save(folder / "0.png")
    Image.fromarray(255 - px).save(folder / "1.png")
    rgb = next(load_data(str(folder), dynamic_cnn(), {"image_size": (8, 8)}).batches(1))["input"][0]
    bgr = next(load_data(str(folder), dynamic_cnn(), {"image_size": (8, 8), "channel_order": "BGR"}).batches(1))["input"][0]
    raw = next(load_data(str(folder), dynamic_cnn(), {"image_size": (8, 8), "scale": 255, "mean": (100.0,),
                                                      "std": (50.0,)}).batches(1))["input"][0]
    np.testing.assert_allclose(rgb, px.transpose(2, 0, 1) / 255.0, atol=1e-6)
    np.testing.assert_allclose(bgr, rgb[::-1], atol=1e-6)
    np.testing.assert_allclose(raw, (px.transpose(2, 0, 1) - 100.0) / 50.0, atol=1e-4)


def test_nhwc_model_suggests_layout_and_mean_message_names_channels(rng, tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    b = GraphBuilder()
    x = b.input("input", ["N", 16, 16, 3])
    b.node("Transpose", [x], out="y", perm=[0, 3, 1, 2])
    b.output("y")
    with pytest.raises(CalibrationError, match="--layout NHWC"):
        load_data(str(folder), b.model())
    with pytest.raises(CalibrationError, match="looks NCHW and the model takes NHWC"):
        load_data(rng.standard_normal((4, 3, 16, 16)).astype(np.float32), b.model())
    b = GraphBuilder()
    b.conv(b.input("input", ["N", 1, 8, 8]), 1, 2, out="y")
    b.output("y")
    with pytest.raises(CalibrationError, match="1 channel: give 1 value"):
        load_data(str(folder), b.model(), {"mean": (0.5, 0.5, 0.5)})


# ----------------------------------------------------------------------------- degenerate data
@pytest.mark.parametrize("make,match", [
    (lambda x: np.zeros_like(x), "input 'input' has zero variance: every value is 0"),
    (lambda x: np.repeat(x[:1], len(x), axis=0), "all 30 samples are identical"),
    (lambda x: x * 1e30, "values up to"),
])
def test_degenerate_data_is_refused(make, match, rng, tmp_path, capsys):
    from graphs import conv_bn_net
    x = rng.standard_normal((30, 3, 8, 8)).astype(np.float32)
    with pytest.raises(CalibrationError, match=match):
        shrink(conv_bn_net(), "pfa", calibration=make(x))
    onnx.save(conv_bn_net(), tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", make(x))
    rc = main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--passes", "pfa", "--calibration-data",
               str(tmp_path / "d.npy"), "--quiet"])
    assert rc == 2 and "'input'" in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()


def test_few_distinct_samples_warn(rng):
    from graphs import conv_bn_net
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match="only 3 distinct sample"):
        load_data(np.concatenate([x] * 4), conv_bn_net())


def test_single_sample_without_validation_data_is_refused(rng):
    """Before: validated on random inputs, saying 'random inputs (no calibration data given)'."""
    from graphs import conv_bn_net
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    with pytest.raises(CalibrationError, match="single sample .* no validation data"):
        shrink(conv_bn_net(), "foldbn", calibration=x)
    with pytest.raises(CalibrationError, match="a single sample"):   # one feed of one sample
        shrink(seq_model(), "foldbn", calibration=[{"x": rng.standard_normal((1, 5, 16)).astype(np.float32)}])
    res = shrink(conv_bn_net(), "foldbn", calibration=x, validation=rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    assert res.report["validation"]["samples"] == 4


def test_nonfinite_outputs_never_score_perfect():
    from onnxshrink.validate import Tolerances, _tolerance_failures, compare_outputs
    x = np.ones((4, 3))
    m = compare_outputs({"o": x}, {"o": np.full_like(x, np.nan)})
    assert m["o"]["nonfinite_mismatch"] == 12 and _tolerance_failures(m, Tolerances(min_cosine=None))
    both = np.full_like(x, np.nan)
    m = compare_outputs({"o": both}, {"o": both.copy()})
    assert m["o"]["nonfinite_both"] == 12 and np.isnan(m["o"]["cosine"])
    assert any("no finite value" in f for f in _tolerance_failures(m, Tolerances()))
    part = x.copy()
    part[0] = np.inf
    m = compare_outputs({"o": part}, {"o": part.copy()})
    assert m["o"]["nonfinite_both"] == 3 and m["o"]["cosine"] == pytest.approx(1.0)
    assert not _tolerance_failures(m, Tolerances())


def test_nan_model_fails_validation(rng):
    """A rewrite whose outputs are NaN where the original's are finite fails, whatever the tolerances."""
    from onnxshrink.validate import Tolerances, validate
    from onnxshrink.calibrate import DataSource
    m = seq_model()
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    for t in bad.graph.initializer:
        arr = numpy_helper.to_array(t).copy()
        if arr.ndim == 2:
            arr[:] = np.nan
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            break
    data = load_data(seq_feeds(rng, 4), m)
    v = validate(m, bad, data, Tolerances(min_cosine=None))
    assert not v["passed"] and "NaN" in " ".join(v["problems"]) and v["feeds"] == 4


def test_image_folder_of_different_sizes_through_the_cli(rng, tmp_path):
    from PIL import Image
    import json
    onnx.save(dynamic_cnn(), tmp_path / "m.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 60), (60, 40), (33, 50), (64, 64), (20, 90)] * 2):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    rc = main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--passes", "pfa", "--calibration-data",
               str(folder), "--max-side", "48", "--size-multiple", "16", "--mean", "0.5", "--std", "0.25",
               "--report", str(tmp_path / "r.json"), "--quiet", "--force"])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and rep["validation"]["feeds"] == 2
    sizes = {tuple(s["inputs"]["input"][2:]) for s in rep["cost_shapes"]}
    # the shapes of the feeds the passes fit on: the two held out (held_out_units(10, 2): the 5th and
    # 10th, both 20 x 90 -> 16 x 48) are not among them
    assert sizes == {(32, 48), (48, 32), (48, 48)}


def test_flops_target_on_a_model_static_inference_cannot_count(rng, tmp_path):
    """Before: --target-flops on a model whose shapes static inference misses counted 0 FLOPs and
    reported "reached": 0.0, "met": true. Now the FLOPs are counted at the data's shapes."""
    import json
    onnx.save(reshape_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 6, 16)).astype(np.float32))
    # about counting FLOPs: a random-weight MatMul on white noise at rank 0.8 is a real loss (relative
    # L2 0.37, which the default gate rightly fails), so this test keeps the former cosine-only gate
    rc = main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--passes", "lowrank", "--calibration-data",
               str(tmp_path / "d.npz"), "--target-flops", "0.8", "--set", "lowrank.rank_multiple=1",
               "--report", str(tmp_path / "r.json"), "--quiet", "--force", "--gate", "cosine-only"])
    rep = json.loads((tmp_path / "r.json").read_text())
    t = rep["targets"]["flops"]
    # + the Mul and the Add on the shape vector (3 each) and the Mul of max(x) by 0 (1)
    assert rc == 0 and rep["before"]["flops"] == 2 * 6 * 16 * 32 * 2 + 6 * 32 + 3 + 3 + 1
    assert 0 < t["reached"] <= 0.8 * 1.05 and t["met"] and rep["passes"][0]["changed"]


def test_statistics_accumulate_over_feeds_of_different_shapes(rng):
    """Gram matrices of rows (sequences) and of conv patches (images) over feeds of different
    shapes equal those computed feed by feed directly."""
    from onnxshrink.calibrate import collect, with_outputs
    from onnxshrink.stats import LayerStats, ResponseStats
    m = seq_model()
    feeds = seq_feeds(rng, 6)
    src = load_data(feeds, m)
    mm = m.graph.node[0]   # the first MatMul: x -> hidden
    got = collect(src, [ResponseStats(mm.output[0], "rows"), LayerStats("l", "x", mm.output[0])], m)
    outs = [run(with_outputs(m, [mm.output[0]]), f)[1] for f in feeds]
    rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs]).astype(np.float64)
    xs = np.concatenate([f["x"].reshape(-1, 16) for f in feeds]).astype(np.float64)
    r = got[f"resp:{mm.output[0]}:rows"]
    assert r.n == len(rows) and np.allclose(r.outer, rows.T @ rows, rtol=1e-5)
    assert got["l"].n == len(xs) and np.allclose(got["l"].xy, xs.T @ rows, rtol=1e-4, atol=1e-3)
    cnn = dynamic_cnn()
    conv = cnn.graph.node[0]
    imgs = image_feeds(rng, SIZES)
    req = LayerStats("c", "input", conv.output[0], kind="conv", positions=0,
                     conv_attrs={"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]})
    acc = collect(load_data(imgs, cnn), [req], cnn)["c"]
    assert acc.n == sum(h * w for h, w in SIZES)   # every output position of every image
    ys = np.concatenate([run(with_outputs(cnn, [conv.output[0]]), f)[1][0].reshape(8, -1).T for f in imgs])
    assert np.allclose(acc.yy, (ys.astype(np.float64) ** 2).sum(0), rtol=1e-4)


def batch1_model(seed=0):
    """input(N,3,8,8) -> Conv3x3 -> Relu -> Conv3x3 -> Relu -> Reshape [1,16,64] -> ReduceMean -> Gemm -> logits(N,10)

    The batch dim is symbolic, but the Reshape target is a constant with the exporter's batch of 1
    baked in: the model runs one sample at a time only (two stacked samples fail in the Reshape)."""
    b = GraphBuilder(seed)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 8))
    h = b.relu(b.conv(h, 8, 16))
    h = b.node("Reshape", [h, b.const(np.array([1, 16, 64], np.int64))])
    h = b.node("ReduceMean", [h], axes=[2], keepdims=0)
    b.gemm(h, 16, 10, out="logits")
    b.output("logits", ["N", 10])
    return b.model()


@pytest.mark.parametrize("pass_name", ["pfa", "lowrank", "hadamard", "pq", "basisconv"])
def test_batch1_only_model_runs_every_pass(pass_name):
    """Stacked feeds fail in the Reshape; each feed alone runs: the data is never stacked for this
    model (batches of 1), every pass runs, the report says why."""
    rng = np.random.default_rng(0)
    model = batch1_model()
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    stacked = {"input": np.concatenate([feeds[0]["input"], feeds[1]["input"]])}
    with pytest.raises(Exception):
        run(model, stacked)   # the planted failure is real
    run(model, feeds[0])
    res = shrink(model, pass_name, calibration=feeds, force=True, options=LOWRANK.get(pass_name))
    notes = res.report["validation"]["notes"]
    assert any("one sample at a time" in n for n in notes), notes
    assert res.report["validation"]["samples"] == 5
    for f in feeds[:3]:   # the result still runs at batch 1
        assert run(res.model, f)[0].shape == (1, 10)


def test_batch1_probe_leaves_stackable_models_alone():
    """A model that runs stacked batches keeps its batching (no note, no limit)."""
    from onnxshrink.calibrate import probe_batching
    rng = np.random.default_rng(1)
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    src = load_data(feeds, dynamic_cnn())
    assert probe_batching(dynamic_cnn(), src) is None and src.max_batch is None
    src = load_data(feeds, batch1_model())
    assert probe_batching(batch1_model(), src) is not None and src.max_batch == 1
    assert [src.batch_count(b) for b in src.batches(64)] == [1, 1, 1, 1]
    part = src.subset(2, 4)
    assert part.max_batch == 1 and part.count_batches(64) == 2
