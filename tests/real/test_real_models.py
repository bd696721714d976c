"""Every real zoo model × every applicable pass at a modest budget (FLOPs/params to 0.9 where the
pass searches a budget, defaults otherwise): the result passes ``onnx.checker`` (full) and loads
in ONNX Runtime, the tool's validation passes, and the model's task metric against the original
on held-out feeds reaches the entry's threshold. A pass applies when its plan names at least one
node of the model; otherwise the pair is skipped with that reason.

Pairs that fail today are in ``KNOWN_FAILURES`` (strict xfail with the current failure), so they
flip to an unexpected pass when fixed. Subsets: ``-k pnet``, ``-k pfa``, or ``ONNXSHRINK_ZOO_SHARD=i/n``
for the i-th of n rotating shards.

Pairs that need more than ten minutes of CPU (``bench/run.py --zoo`` measures CPU seconds, steady on a
loaded machine) are in ``SLOW_PAIRS`` and skipped with their measured time unless
``ONNXSHRINK_ZOO_SLOW=1``. With ``ONNXSHRINK_ZOO_CI=1`` (``.ci/run``) only the pairs of ``CI_PAIRS``
run (measured, fast, outcome clear of its threshold; those within 1 % of a task-metric or
validation threshold are in ``NOT_IN_CI`` with the figure), and with ``ONNXSHRINK_ZOO_BUDGET_S=S`` a
pass test that would start after S seconds of the session is skipped with that reason (a wall-time
bound: the last test started runs to its end).
"""

import functools
import os
import time

import numpy as np
import pytest

import realzoo
from onnxshrink.errors import TargetError, ValidationFailed

pytestmark = pytest.mark.real

# (model, pass) -> the failure seen today (strict xfail), figures of bench/zoo_results.json (the
# channel_multiple=1 figures from an earlier run).
KNOWN_FAILURES = {
    ("mtcnn_pnet", "pfa"): "box recall 0.566 < 0.95 (FLOPs 0.865 for a 0.9 target: groups "
                           "of 10/16 now move in steps of 1/2 channels; any pruning flips marginal detections: "
                           "2 of 16 channels of conv2d_1 alone, FLOPs 0.90, recall 0.75)",
    ("mtcnn_pnet", "basisconv"): "box recall 0.838 < 0.95 (FLOPs 0.882: conv2d_2 at rank 21 of 32, the one "
                                 "layer off the multiple of 8; 0.769 at rank 16 before)",
    ("oww_embedding", "pfa"): "worst-sample embedding cosine 0.988 < 0.99 (FLOPs 0.898; the default gate passes: "
                              "the allocation measures each group's output effect held out, pfa.measured=None; "
                              "0.966 with the in-sample curves, pfa.measured=false; the max_drop search keeps it "
                              "within 0.01 at FLOPs 0.93)",
    ("oww_embedding", "basisconv"): "worst-sample embedding cosine 0.917 < 0.99, which the default gate fails (< 0.98) "
                                    "(FLOPs 0.899; 0.934 with the opt-in basisconv.measured)",
    ("captcha_crnn", "pfa"): "the same text on 0.812 of the captchas < 0.9 (FLOPs 0.900; "
                             "26 of 32, 28 in a run before the last change)",
    ("captcha_crnn", "basisconv"): "validation passes but the same text on 0.844 of the captchas < 0.9 (FLOPs 0.897)",
    ("magika", "pfa"): "the default gate refuses it: one of the 20 held-out files' label changes (same label "
                       "0.950) with its probability 0.533 off (FLOPs 0.876: the Dense's 64 channels to 56, the Conv's "
                       "input with them; the Conv's 512 outputs feed a LayerNorm over them and stay whole)",
    ("magika", "basisconv"): "the default gate refuses it: every label kept, one file's probability 0.439 off "
                             "(FLOPs 0.898)",
    ("magika", "lowrank"): "the default gate refuses it: one of 20 files' label changes (0.950), its probability "
                           "0.601 off (params 0.897)",
    ("ocr_recognizer", "pfa"): "the same text on 0.667 of the lines < 0.9 and the default gate fails (FLOPs 0.900: "
                               "a character's probability 0.9996 off; its heads are groups, the budget keeps them)",
    ("ocr_recognizer", "lowrank"): "the same text on 0.867 of the lines < 0.9 and the default gate fails (params "
                                   "0.885: a character's probability 0.434 off)",
    ("ocr_recognizer", "pq"): "the default gate refuses it: one character's probability 0.360 off (> 0.35), the same "
                              "text on 0.900 of the lines (27 of 30); at the default per-layer budget 0.167, fitted "
                              "again at 0.1x by pq.tighten; the original with its weights rounded to fp16 is 0.359 off",
}


# (model, pass) -> why the budget is out of the pass's reach: a correct refusal (TargetError naming the
# share of the cost the pass acts on), asserted as such rather than as a failure
UNREACHABLE = {
    ("vit_focus", "basisconv"): "FLOPs 0.993 (target 0.900): basisconv acts on 0.8 % of the FLOPs (the 16×16 "
                                "patch-embedding Conv; the rest is MatMul/attention)",
    ("ocr_recognizer", "basisconv"): "FLOPs 0.987 (target 0.900): basisconv acts on 1.7 % of the FLOPs (the first "
                                     "3×3 Conv and the neck's 1×3 Convs; the 5×5 and 3×3 Convs are depthwise)",
    ("oww_melspec", "lowrank"): "params 0.978 (target 0.900): lowrank acts on 3.0 % of the params, the mel "
                                "MatMul 257×32 (8.2 K of 271 K params; at rank 8, its lowest, it saves 5.9 K); 97 % are "
                                "the STFT's two Conv1d 257×1×512, whose basis + 1×1 split is basisconv's (it "
                                "passes at FLOPs 0.9, params 0.894), not a Gemm/MatMul or a k×k kernel",
}

# (model, pass) -> measured time: pairs over ten minutes, skipped unless ONNXSHRINK_ZOO_SLOW=1
SLOW_PAIRS = {
}

# (model, pass) -> why CI leaves the pair out (an outcome within 1 % of its threshold)
NOT_IN_CI = {
    ("oww_embedding", "pq"): "worst cosine 0.998 against a threshold of 0.99 (0.8 % margin)",
    ("mtcnn_pnet", "pq"): "box recall 0.978 = 133 of 136 boxes against 0.95: four boxes fewer would fail",
    ("khmer_segmenter", "pq"): "same segmentation 0.917 = 22 of 24 sentences against 0.9: one sentence "
                               "more would fail",
    ("khmer_segmenter", "lowrank"): "same segmentation 0.917 = 22 of 24 sentences against 0.9: one sentence "
                                    "more would fail",
    ("khmer_segmenter", "pfa"): "same segmentation 0.917 = 22 of 24 sentences against 0.9 (FLOPs 0.900, the "
                                "allocation measuring each group's output effect held out): one sentence more would fail",
    ("oww_embedding", "pfa"): "worst cosine 0.988 against a threshold of 0.99 (0.2 % below)",
    ("magika", "pq"): "same label 1.000 = 20 of 20 files against 0.95: two changed labels would fail",
    ("vit_focus", "lowrank"): "map IoU@0.5 0.904 against a threshold of 0.9 (0.4 % above; 0.898 before "
                              "the second factor's ridge was chosen on held-out rows)",
}

# The pairs CI may run (ONNXSHRINK_ZOO_CI=1): measured (bench/zoo_results.json: outcome, the tool's wall
# seconds on 2 free cores and its CPU seconds, the task metric), outcome clear of its threshold by more
# than 1 % (and by more than one sample on a count metric), under 300 CPU seconds.
# A pair not measured yet stays out.
CI_PAIRS = {
    ("nsfw_resnet50", "pfa"): "pass, 22 s (31 CPU s): same label 1.000",
    ("nsfw_resnet50", "basisconv"): "pass, 8 s (12 CPU s): same label 1.000",
    ("nsfw_resnet50", "pq"): "pass, 19 s (29 CPU s): same label 1.000",
    ("mtcnn_pnet", "pfa"): "fail, 1 s (1 CPU s): box recall@0.5 0.566",
    ("mtcnn_pnet", "basisconv"): "fail, 0 s (0 CPU s): box recall@0.5 0.838",
    ("mtcnn_rnet", "pfa"): "pass, 0 s (1 CPU s): same face decision 1.000",
    ("mtcnn_rnet", "basisconv"): "pass, 0 s (0 CPU s): same face decision 1.000",
    ("mtcnn_rnet", "lowrank"): "pass, 0 s (0 CPU s): same face decision 1.000",
    ("mtcnn_rnet", "hadamard"): "pass, 0 s (0 CPU s): same face decision 1.000",
    ("mtcnn_rnet", "pq"): "pass, 1 s (1 CPU s): same face decision 1.000",
    ("mtcnn_onet", "pfa"): "pass, 2 s (3 CPU s): same face decision 1.000",
    ("mtcnn_onet", "basisconv"): "pass, 0 s (1 CPU s): same face decision 1.000",
    ("mtcnn_onet", "lowrank"): "pass, 1 s (1 CPU s): same face decision 1.000",
    ("mtcnn_onet", "hadamard"): "pass, 1 s (2 CPU s): same face decision 1.000",
    ("mtcnn_onet", "pq"): "pass, 5 s (6 CPU s): same face decision 1.000",
    ("captcha_crnn", "pfa"): "fail, 10 s (14 CPU s): same text 0.812",
    ("captcha_crnn", "basisconv"): "fail, 4 s (6 CPU s): same text 0.844",
    ("captcha_crnn", "lowrank"): "pass, 11 s (15 CPU s): same text 1.000",
    ("captcha_crnn", "hadamard"): "pass, 2 s (3 CPU s): same text 1.000",
    ("captcha_crnn", "pq"): "pass, 33 s (50 CPU s): same text 1.000",
    ("oww_melspec", "pfa"): "pass, 0 s (0 CPU s): 1 − worst rel. L2 1.000",
    ("oww_melspec", "basisconv"): "pass, 0 s (0 CPU s): 1 − worst rel. L2 0.997",
    ("oww_melspec", "lowrank"): "unreachable (expected TargetError), 0 s",
    ("oww_melspec", "hadamard"): "pass, 0 s (0 CPU s): 1 − worst rel. L2 1.000",
    ("oww_melspec", "pq"): "pass, 2 s (3 CPU s): 1 − worst rel. L2 0.996",
    ("oww_embedding", "basisconv"): "fail, 0 s (1 CPU s): worst cosine 0.917",
    ("oww_hey_jarvis", "lowrank"): "pass, 1 s (1 CPU s): score agreement 1.000",
    ("oww_hey_jarvis", "hadamard"): "pass, 0 s (0 CPU s): score agreement 1.000",
    ("oww_hey_jarvis", "pq"): "pass, 3 s (3 CPU s): score agreement 1.000",
    ("vit_focus", "foldbn"): "pass, 4 s (6 CPU s): map IoU@0.5 1.000",
    ("vit_focus", "pfa"): "pass, 34 s (50 CPU s): map IoU@0.5 0.966",
    ("vit_focus", "hadamard"): "pass, 32 s (42 CPU s): map IoU@0.5 0.920",
    ("khmer_segmenter", "hadamard"): "pass, 4 s (5 CPU s): same segmentation 0.958",
    ("khmer_segmenter", "pq"): "pass, 7 s (10 CPU s): same segmentation 0.917",
    ("magika", "pfa"): "fail, 8 s: same label 0.950, the gate refuses it",
    ("magika", "basisconv"): "fail, 1 s: same label 1.000, the gate refuses it",
    ("magika", "lowrank"): "fail, 2 s: same label 0.950, the gate refuses it",
    ("magika", "hadamard"): "pass, 1 s: same label 1.000 (no Fastfood structure within tolerance: unchanged)",
    ("ocr_direction", "foldbn"): "pass, 0 s (1 CPU s): same label 1.000",
    ("ocr_direction", "pfa"): "pass, 13 s (20 CPU s): same label 1.000",
    ("ocr_direction", "pq"): "pass, 7 s (9 CPU s): same label 1.000",
    ("ocr_detector", "foldbn"): "pass, 1 s (1 CPU s): text map IoU@0.3 1.000",
    ("ocr_detector", "pfa"): "pass, 8 s (12 CPU s): text map IoU@0.3 0.983",
    ("ocr_detector", "basisconv"): "pass, 4 s (7 CPU s): text map IoU@0.3 0.963",
    ("ocr_detector", "pq"): "pass, 30 s (30 CPU s): text map IoU@0.3 0.983",
    ("ocr_recognizer", "foldbn"): "pass, 2 s (3 CPU s): same text 1.000",
    ("ocr_recognizer", "basisconv"): "unreachable (expected TargetError), 1 s",
    ("ocr_recognizer", "pfa"): "fail, 30 s (36 CPU s): same text 0.667",
    ("ocr_recognizer", "lowrank"): "fail, 4 s (8 CPU s): same text 0.867",
    ("ocr_recognizer", "pq"): "fail, 72 s (84 CPU s): same text 0.900, the gate refuses it",
}

_ENV_ON = lambda name: os.environ.get(name, "") not in ("", "0")  # noqa: E731
_START = time.monotonic()


def _shard(pairs):
    shard = os.environ.get("ONNXSHRINK_ZOO_SHARD")
    if not shard:
        return pairs
    try:
        i, n = (int(v) for v in shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"ONNXSHRINK_ZOO_SHARD={shard!r}: expected i/n with 0 <= i < n") from None
    return pairs[i::n]


def _pairs():
    pairs = [(m, p) for m in realzoo.ZOO for p in realzoo.PASSES]
    if _ENV_ON("ONNXSHRINK_ZOO_CI"):   # CI shards only the pairs it can run
        pairs = [q for q in pairs if q in CI_PAIRS and q not in NOT_IN_CI and q not in SLOW_PAIRS]
    out = []
    for m, p in _shard(pairs):
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(m, p)])] if (m, p) in KNOWN_FAILURES else []
        out.append(pytest.param(m, p, id=f"{m}-{p}", marks=marks))
    return out


def entry_or_skip(name):
    """The zoo entry with its model file at hand, or a skip saying why the package cannot be had."""
    e = realzoo.ZOO[name]
    try:
        e.model_path()
    except realzoo.Unavailable as exc:
        pytest.skip(f"{name}: {exc}")
    return e


@functools.lru_cache(maxsize=None)
def _data(name):
    e = realzoo.ZOO[name]
    calib, val = e.feeds("calib"), e.feeds("val")
    return calib, val, realzoo.run(e.model_path(), val)


@pytest.mark.parametrize("name", list(realzoo.ZOO))
def test_original_runs_and_metric_is_one(name):
    e = entry_or_skip(name)
    calib, val, orig = _data(name)
    assert 20 <= len(calib) <= 200 and 14 <= len(val) <= 64, (len(calib), len(val))
    for outs in orig:
        for k, v in outs.items():
            assert np.all(np.isfinite(v)), (name, k)
    assert e.metric(orig, orig, val) == pytest.approx(1.0, abs=1e-9)
    # the split is held out: no validation feed equals a calibration feed
    key = lambda f: b"".join(np.ascontiguousarray(v).tobytes() for v in f.values())  # noqa: E731
    assert not ({key(f) for f in calib} & {key(f) for f in val})


@pytest.mark.parametrize("name", list(realzoo.ZOO))
def test_varying_shape_feeds_run(name):
    """The varying-shape variant (real sizes) runs through the original model (the pass tests use
    the fixed variant, whose figures the known failures and the bench table record)."""
    e = entry_or_skip(name)
    feeds = e.feeds("val", varying=True)
    outs = realzoo.run(e.model_path(), feeds[:8])
    assert len(outs) == min(8, len(feeds))


@pytest.mark.parametrize("name,pass_name", _pairs())
def test_pass_keeps_task(name, pass_name):
    if (name, pass_name) in SLOW_PAIRS and not _ENV_ON("ONNXSHRINK_ZOO_SLOW"):
        pytest.skip(f"slow pair ({SLOW_PAIRS[(name, pass_name)]}); ONNXSHRINK_ZOO_SLOW=1 runs it")
    budget = os.environ.get("ONNXSHRINK_ZOO_BUDGET_S")
    if budget and time.monotonic() - _START > float(budget):
        pytest.skip(f"the wall-time budget of {float(budget):.0f} s (ONNXSHRINK_ZOO_BUDGET_S) is spent")
    e = entry_or_skip(name)
    if not realzoo.planned(e, pass_name):
        pytest.skip(f"{pass_name}: its plan touches no node of {name}")
    calib, val, orig = _data(name)
    if (name, pass_name) in UNREACHABLE:
        import cases_zoo
        with pytest.raises(TargetError) as exc:
            realzoo.shrink_entry(e, pass_name, calib, val)
        assert "acts on" in str(exc.value), str(exc.value)
        assert cases_zoo.unreachable(exc.value, pass_name), str(exc.value)
        return
    try:
        res, _ = realzoo.shrink_entry(e, pass_name, calib, val)
    except ValidationFailed as exc:
        pytest.fail(f"{name}/{pass_name}: {exc}")
    realzoo.check_valid(res.model)
    assert res.report["validation"]["passed"]
    score = e.metric(orig, realzoo.run(res.model, val), val)
    assert score >= e.threshold, f"{name}/{pass_name}: {e.metric_name} {score:.3f} < {e.threshold}"


# The models whose real inputs vary in shape (pictures at their own aspect, audio and sentences of
# their own length), each with the passes that apply to it. Run with ``-k varying``; CI leaves these
# out (ONNXSHRINK_ZOO_CI), the full real tier runs them.
VARYING_MODELS = ("mtcnn_pnet", "oww_melspec", "khmer_segmenter")


def _varying_pairs():
    if _ENV_ON("ONNXSHRINK_ZOO_CI"):
        return []
    return [pytest.param(m, p, id=f"varying-{m}-{p}") for m in VARYING_MODELS for p in realzoo.PASSES]


@pytest.mark.parametrize("name,pass_name", _varying_pairs())
def test_pass_runs_on_varying_shape_feeds(name, pass_name):
    """Calibration and validation feeds of different shapes go through the pass as they are: no
    refusal to stack, no layer the data reached skipped for an unknown shape, FLOPs counted at the
    feeds' own shapes (several signatures in the report), and the written model runs on every
    validation feed with finite outputs. (The task metric on these feeds is recorded in the
    failure message only: the known failures above are measured on the fixed-shape variant.)"""
    e = entry_or_skip(name)
    if not realzoo.planned(e, pass_name):
        pytest.skip(f"{pass_name}: its plan touches no node of {name}")
    calib, val = e.feeds("calib", varying=True), e.feeds("val", varying=True)
    sig = lambda f: tuple(sorted((k, np.shape(v)) for k, v in f.items()))  # noqa: E731
    assert len({sig(f) for f in calib}) > 1, f"{name}: the varying feeds all have one shape"
    res, _ = realzoo.shrink_entry(e, pass_name, calib, val, force=True)   # a missed budget is not the point here
    reasons = [s["reason"] for p in res.report["passes"] for s in p.get("skipped", [])]
    assert not [r for r in reasons if "shape" in r and "unknown" in r], reasons
    assert res.report["after"]["flops"] is not None and res.report["before"]["flops"] is not None
    assert len(res.report["cost_shapes"]) > 1, res.report["cost_shapes"]
    realzoo.check_valid(res.model)
    outs = realzoo.run(res.model, val)
    assert len(outs) == len(val)
    for o in outs:
        for k, v in o.items():
            assert np.all(np.isfinite(v)), (name, pass_name, k)


def test_max_drop_search_keeps_the_embedding_within_one_point():
    """Issue 12 on a real model: ``metric="cosine"`` (the worst sample's cosine to the original's
    output, the zoo's own metric for the embedding model) with ``max_drop=0.01`` and pfa: the
    accuracy search finds a budget, reports the FLOPs it reached, and the written model keeps the
    worst held-out cosine within 0.01 of the original. (About 120 CPU s: CI leaves it out.)"""
    if _ENV_ON("ONNXSHRINK_ZOO_CI"):
        pytest.skip("accuracy search on oww_embedding: about 120 CPU s, outside the CI pairs")
    e = entry_or_skip("oww_embedding")
    calib, val, orig = _data("oww_embedding")
    res, _ = realzoo.shrink_entry(e, "pfa", calib, val, target_flops=None, metric="cosine", max_drop=0.01)
    search = res.report["search"]
    assert search["budget"] == "flops" and search["chosen"] is not None, search.get("problem")
    chosen = [s for s in search["steps"] if s["within"] and s["reached"] <= res.report["ratios"]["flops"] + 0.02]
    assert chosen, search["steps"]
    assert res.report["ratios"]["flops"] < 0.99                 # it compressed, and says how far
    m = res.report["validation"]["metric"]
    assert m["name"] == "cosine" and m["within"] and m["drop"] <= 0.01
    assert e.metric(orig, realzoo.run(res.model, val), val) >= 1 - 0.01
