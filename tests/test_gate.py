"""The zoo validation gate (``ZOO_GATE``, opt-in): a planted broken detection head fails it while
raw cosine alone would pass it; a faithful rewrite of the same model passes; scores that all sit
near 0 are judged on their own absolute scale."""

import numpy as np
import onnx
from graphs import GraphBuilder
from onnx import numpy_helper

from onnxshrink.calibrate import load_data
from onnxshrink.validate import ZOO_GATE, Tolerances, validate

GATE = Tolerances(**ZOO_GATE)

COSINE_ONLY = Tolerances(min_cosine=0.9, min_top1=None, max_rel_l2=None, max_range_error=None, min_worst_cosine=None)


def detector(seed=0):
    """input(N,3,12,12) -> Conv -> Relu -> Conv -> Relu -> head Conv 1x1 (6 ch) -> Transpose NHWC -> Split
         -> boxes (N,12,12,4)
         -> Softmax over the last axis -> scores (N,12,12,2)

    A proposal net in the shape of MTCNN's P-Net: a box map and a score map per position."""
    b = GraphBuilder(seed)
    x = b.input("input", ["N", 3, 12, 12])
    h = b.relu(b.conv(x, 3, 16))
    h = b.relu(b.conv(h, 16, 16))
    h = b.node("Transpose", [b.conv(h, 16, 6, k=1)], perm=[0, 2, 3, 1])
    boxes, logits = b.node("Split", [h, b.const(np.array([4, 2], np.int64))], n_out=2, axis=3)
    b.node("Identity", [boxes], out="boxes")
    b.node("Softmax", [logits], out="scores", axis=-1)
    b.output("boxes", ["N", 12, 12, 4])
    b.output("scores", ["N", 12, 12, 2])
    return b.model()


def _perturb_head(model, rel, rows=slice(0, 4), seed=1):
    """A copy whose head Conv (the last Conv) has weights W + rel·‖W‖·R/‖R‖ on output channels ``rows``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    head = [n for n in m.graph.node if n.op_type == "Conv"][-1]
    init = next(t for t in m.graph.initializer if t.name == head.input[1])
    w = numpy_helper.to_array(init).copy()
    r = np.random.default_rng(seed).standard_normal(w[rows].shape).astype(np.float32)
    w[rows] += rel * np.linalg.norm(w[rows]) * r / np.linalg.norm(r)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return m


def _feeds(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def test_broken_detection_head_fails_default_gate_that_cosine_passes():
    model = detector()
    data = load_data(_feeds(), model)
    broken = _perturb_head(model, 0.35)
    old = validate(model, broken, data, COSINE_ONLY)
    assert old["passed"], old["problems"]                       # raw cosine hides it ...
    assert old["outputs"]["boxes"]["cosine"] > 0.9
    new = validate(model, broken, data, GATE)
    assert not new["passed"]                                    # ... the default gate does not
    boxes = [p for p in new["problems"] if "'boxes'" in p]
    assert any("relative L2" in p for p in boxes) and any("worst-sample cosine" in p for p in boxes), new["problems"]
    m = new["outputs"]["boxes"]
    assert m["rel_l2"] > 0.2 and m["worst"]["cosine"] < 0.98 and m["worst_rel_l2"] >= m["worst"]["rel_l2"]
    assert m["values_per_sample"] == 12 * 12 * 4 and not m["probability"]


def test_broken_score_head_fails_on_probability_scale():
    """Score logits perturbed: the softmax output is a probability distribution over the last
    axis; its max abs error on the probability scale and its top-1 agreement are judged."""
    model = detector()
    data = load_data(_feeds(), model)
    broken = _perturb_head(model, 1.5, rows=slice(4, 6))
    new = validate(model, broken, data, GATE)
    m = new["outputs"]["scores"]
    assert m["probability"] and m["distribution"] and m["scale"] == 1.0
    assert any("'scores'" in p and "probability scale" in p for p in new["problems"]), new["problems"]
    assert m["top1_agreement"] < 1.0


def test_faithful_rewrite_passes_default_gate():
    model = detector()
    data = load_data(_feeds(), model)
    close = _perturb_head(_perturb_head(model, 0.01), 0.01, rows=slice(4, 6), seed=2)
    v = validate(model, close, data, GATE)
    assert v["passed"], v["problems"]
    assert v["outputs"]["scores"]["top1_agreement"] > 0.95
    assert 0 < v["outputs"]["boxes"]["rel_l2"] < 0.05


def _tiny_score_model(seed=0):
    """x(N,16) -> Gemm 16x8 -> Relu -> Gemm 8x1 -> - 9 -> Sigmoid -> score(N,1): scores near 0 (a wake-word
    head on audio without the word)."""
    b = GraphBuilder(seed)
    x = b.input("x", ["N", 16])
    h = b.gemm(b.relu(b.gemm(x, 16, 8)), 8, 1)
    b.node("Sigmoid", [b.node("Sub", [h, b.const(np.array([9.0], np.float32))])], out="score")
    b.output("score", ["N", 1])
    return b.model()


def test_near_zero_scores_judged_on_absolute_scale():
    """Scores all near 0 (sigmoid of ≈ −9): a rewrite that moves them by 1e-4 has a poor cosine and
    relative L2 (noise on a near-zero signal) but keeps every decision: the default gate passes it;
    one that moves a score by 0.5 fails."""
    model = _tiny_score_model()
    rng = np.random.default_rng(0)
    data = load_data({"x": rng.standard_normal((40, 16)).astype(np.float32)}, model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    sub = next(n for n in m.graph.node if n.op_type == "Sub")
    init = next(t for t in m.graph.initializer if t.name == sub.input[1])
    for shift, passes in ((-1.5, True), (-9.0, False)):   # scores ×~4.5 (still ≈ 0.0005) / to ≈ 0.5
        init.CopyFrom(numpy_helper.from_array(np.array([9.0 + shift], np.float32), init.name))
        v = validate(model, m, data, GATE)
        assert v["outputs"]["score"]["probability"]
        assert v["passed"] is passes, v["problems"]
        if passes:   # the relative measures would have failed it
            assert v["outputs"]["score"]["rel_l2"] > 0.2
