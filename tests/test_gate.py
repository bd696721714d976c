"""The default validation gate (``Tolerances()``, chosen on the zoo: ``ZOO_GATE``): planted broken
detection heads fail it while raw cosine alone (the former default, ``Tolerances.cosine_only()``)
would pass them; a faithful rewrite of the same model passes; scores that all sit near 0 are
judged on their own absolute scale."""

import dataclasses

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, run
from onnx import numpy_helper

from onnxshrink.calibrate import load_data
from onnxshrink.validate import ZOO_GATE, Tolerances, validate

GATE = Tolerances()

COSINE_ONLY = Tolerances.cosine_only()


def test_default_is_the_zoo_gate_and_cosine_only_is_explicit():
    assert dataclasses.asdict(GATE) == {"max_error": None, **ZOO_GATE}
    off = [f for f, v in dataclasses.asdict(COSINE_ONLY).items() if v is None]
    assert COSINE_ONLY.min_cosine == 0.9 and len(off) == len(dataclasses.fields(Tolerances)) - 1


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


def _perturb_head(model, rel, rows=slice(0, 4), seed=1, conv=-1):
    """A copy whose head Conv (the last Conv, or Conv number ``conv``) has weights W + rel·‖W‖·R/‖R‖
    on output channels ``rows``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    head = [n for n in m.graph.node if n.op_type == "Conv"][conv]
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


def anchor_detector(seed=0, anchors=3):
    """input(N,3,16,16) -> Conv s2 -> Relu -> Conv -> Relu -> two 1x1 heads over the 8x8 cells:
         -> boxes (N, 192, 4)                 (4 numbers per anchor)
         -> Sigmoid -> scores (N, 192)        (one objectness score per anchor)

    A single-stage detector's head (YOLO/SSD style, 3 anchors a cell). The score bias is set so
    that about 10 % of the anchors score above 0.5, as in a picture with a few objects."""
    b = GraphBuilder(seed)
    x = b.input("input", ["N", 3, 16, 16])
    h = b.relu(b.conv(x, 3, 16, stride=2))
    h = b.relu(b.conv(h, 16, 16))
    boxes = b.node("Transpose", [b.conv(h, 16, 4 * anchors, k=1)], perm=[0, 2, 3, 1])
    b.node("Reshape", [boxes, b.const(np.array([0, -1, 4], np.int64))], out="boxes")
    logits = b.node("Transpose", [b.conv(h, 16, anchors, k=1)], perm=[0, 2, 3, 1])
    b.node("Sigmoid", [b.node("Reshape", [logits, b.const(np.array([0, -1], np.int64))])], out="scores")
    b.output("boxes", ["N", None, 4])
    b.output("scores", ["N", None])
    model = b.model()
    scores = np.concatenate([run(model, f)[1].ravel() for f in _det_feeds()])
    q = float(np.quantile(np.log(scores / (1 - scores)), 0.9))
    return _shift_scores(model, q)


def _shift_scores(model, shift):
    """A copy whose score head's bias is lowered by ``shift`` (every anchor's logit − shift)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    head = [n for n in m.graph.node if n.op_type == "Conv"][-1]
    init = next(t for t in m.graph.initializer if t.name == head.input[2])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) - np.float32(shift), init.name))
    return m


def _det_feeds(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def _scores(model):
    return np.concatenate([run(model, f)[1].ravel() for f in _det_feeds()])


def test_planted_broken_score_head_fails_the_default_gate_on_decisions():
    """The issue's case: the scores' raw cosine stays >= 0.99 while the detections kept after the
    score threshold fall to under half. The range error (0.12 of the probability scale) and the
    cosine pass it; the decision IoU (of the values above 0.5 in either model, the share above it
    in both) fails it."""
    model = anchor_detector()
    data = load_data(_det_feeds(), model)
    broken = _shift_scores(model, 0.5)
    a, b = _scores(model), _scores(broken)
    assert 0.08 < (a > 0.5).mean() < 0.12
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    recall = float(((a > 0.5) & (b > 0.5)).sum() / (a > 0.5).sum())
    assert cosine >= 0.99 and recall < 0.5          # what a detection metric sees
    old = validate(model, broken, data, COSINE_ONLY)
    assert old["passed"], old["problems"]            # raw cosine passes it
    v = validate(model, broken, data, GATE)
    m = v["outputs"]["scores"]
    assert m["probability"] and not m["distribution"] and m["score"]
    assert m["range_error"] < ZOO_GATE["max_range_error"]          # not the range check: 0.12
    assert len(v["problems"]) == 1 and "'scores' decision IoU" in v["problems"][0], v["problems"]
    assert m["decision_iou"] == pytest.approx(recall, abs=1e-6) and recall < 0.5   # nothing new above 0.5: IoU = recall
    assert f"{m['decision_iou']:.4f}" in v["problems"][0]
    assert "decision_iou" not in v["outputs"]["boxes"] and v["outputs"]["boxes"]["rel_l2"] == 0.0


def test_faithful_score_head_passes_the_default_gate():
    model = anchor_detector()
    data = load_data(_det_feeds(), model)
    close = _shift_scores(_perturb_head(model, 0.01, rows=slice(0, 12), conv=-2), 0.02)   # boxes 1 %, logits − 0.02
    v = validate(model, close, data, GATE)
    assert v["passed"], v["problems"]
    m = v["outputs"]["scores"]
    assert m["score"] and m["above_threshold"] > 100 and m["decision_iou"] > 0.9
    assert 0 < v["outputs"]["boxes"]["rel_l2"] < 0.05


def test_decision_iou_needs_enough_values_above_the_threshold():
    """Scores all near 0 (background only): fewer than 10 values above 0.5, so there is no decision
    IoU and the check does not apply (the range error still does)."""
    model = _tiny_score_model()
    rng = np.random.default_rng(0)
    data = load_data({"x": rng.standard_normal((40, 16)).astype(np.float32)}, model)
    v = validate(model, model, data, GATE)
    m = v["outputs"]["score"]
    assert m["score"] and m["above_threshold"] < 10 and "decision_iou" not in m and v["passed"]


def test_score_outputs_are_those_a_sigmoid_gives():
    """Through shape-only ops (Reshape) a Sigmoid still makes a score; values in [0, 1] from a Gemm
    (normalised landmarks, boxes) or a Softmax are not thresholded decisions."""
    from onnxshrink.validate import score_outputs
    assert score_outputs(anchor_detector()) == {"scores"}
    assert score_outputs(_tiny_score_model()) == {"score"}
    assert score_outputs(detector()) == set()


def test_cli_flags_start_from_the_default_or_the_cosine_only_gate():
    from onnxshrink.cli import build_parser, tolerances
    p = build_parser()
    assert tolerances(p.parse_args(["a", "b"])) is None      # nothing given: the library's choice
    assert tolerances(p.parse_args(["a", "b", "--gate", "default"])) == GATE
    assert tolerances(p.parse_args(["a", "b", "--gate", "metric"])) == Tolerances.metric_only()
    assert tolerances(p.parse_args(["a", "b", "--gate", "cosine-only"])) == COSINE_ONLY
    t = tolerances(p.parse_args(["a", "b", "--gate", "cosine-only", "--min-decision-iou", "0.7"]))
    assert t == dataclasses.replace(COSINE_ONLY, min_decision_iou=0.7)
    t = tolerances(p.parse_args(["a", "b", "--min-worst-cosine", "none", "--max-error", "0.5"]))
    assert t == dataclasses.replace(GATE, min_worst_cosine=None, max_error=0.5)


def _map_stats(orig, new):
    from onnxshrink.validate import OutputStats
    st = OutputStats(score=True)
    for a, b in zip(orig, new):
        st.add(a, b, feed=0, first_sample=0, samples=1)
    return st.result()


def _text_maps(n=8, size=64, seed=0):
    """Score maps (N=1, 1, size, size) of a few sharp rectangles (text regions): 0.98 inside, 0.02 outside."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        m = np.full((1, 1, size, size), 0.02, np.float32)
        for _ in range(3):
            y, x = rng.integers(0, size - 12, 2)
            m[..., y:y + 8, x:x + int(rng.integers(10, 30))] = 0.98
        maps.append(m)
    return maps


def test_score_map_range_check_reads_the_99th_percentile():
    """A score map of >= 1024 values a sample (a text detector's or a saliency map): where a region's edge
    moves by a pixel in one place, those pixels swing by 0.96 (the max), a few in ten thousand; the range
    check reads the 99.9th percentile of the abs errors and passes, the decision IoU stays high. The same
    maps with a quarter of their text pixels off by 0.38 (still above 0.5: the decision IoU is 1) fail it, with the percentile named."""
    from onnxshrink.validate import MAP_MIN_VALUES, _tolerance_failures
    orig = _text_maps()
    edge = [m.copy() for m in orig]
    for m in edge[:2]:                       # one edge pixel column of one region in two maps
        ys, xs = np.nonzero(m[0, 0] > 0.5)
        m[0, 0, ys[xs == xs.min()], xs.min()] = 0.02
    r = _map_stats(orig, edge)
    assert r["values_per_sample"] >= MAP_MIN_VALUES and r["max_abs"] == pytest.approx(0.96, abs=1e-6)
    assert r["range_error"] > ZOO_GATE["max_range_error"]            # the max alone would refuse it
    assert r["map_abs_quantile"] <= 0.01 and r["decision_iou"] > 0.98
    assert _tolerance_failures({"map": r}, GATE) == []
    gone = [m.copy() for m in orig]
    for m in gone:
        ys, xs = np.nonzero(m[0, 0] > 0.5)
        m[0, 0, ys[:len(ys) // 4], xs[:len(xs) // 4]] = 0.6   # 0.38 off on a quarter of the text pixels, still above 0.5
    r = _map_stats(orig, gone)
    assert 0.35 < r["map_abs_quantile"] <= 0.39 and r["decision_iou"] == 1.0
    fails = _tolerance_failures({"map": r}, GATE)
    assert len(fails) == 1 and "score map" in fails[0] and f"{r['map_abs_quantile']:.4g}" in fails[0], fails


def test_small_score_output_keeps_the_max_abs_range_check():
    """A score output under 1024 values a sample (a classifier's or detector's few scores) is judged on its
    max abs error: one value off by 0.96 fails."""
    from onnxshrink.validate import _tolerance_failures
    rng = np.random.default_rng(0)
    orig = [rng.uniform(0, 1, (1, 100)).astype(np.float32) for _ in range(20)]
    new = [o.copy() for o in orig]
    new[3][0, 7] = 1.0 - new[3][0, 7] if abs(1 - 2 * new[3][0, 7]) > 0.9 else (0.98 if new[3][0, 7] < 0.5 else 0.02)
    r = _map_stats(orig, new)
    assert "map_abs_quantile" not in r and r["range_error"] > 0.35
    fails = _tolerance_failures({"s": r}, GATE)
    assert any("max abs error" in f for f in fails), fails


def test_a_probability_one_ulp_over_one_is_still_a_probability():
    """ONNX Runtime's Sigmoid can give 1.0000001 (one float32 ulp over 1): the output stays a
    probability, so a score map keeps its percentile range check and the probability scale."""
    orig = _text_maps()
    orig[0][0, 0, 0, 0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    edge = [m.copy() for m in orig]
    ys, xs = np.nonzero(edge[1][0, 0] > 0.5)
    edge[1][0, 0, ys[xs == xs.min()], xs.min()] = 0.02
    r = _map_stats(orig, edge)
    assert r["probability"] and r["scale"] == 1.0 and "map_abs_quantile" in r
