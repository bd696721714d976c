"""Every real zoo model × every applicable pass at a modest budget (FLOPs/params to 0.9 where the
pass searches a budget, defaults otherwise): the result passes ``onnx.checker`` (full) and loads
in ONNX Runtime, the tool's validation passes, and the model's task metric against the original
on held-out feeds reaches the entry's threshold. A pass applies when its plan names at least one
node of the model; otherwise the pair is skipped with that reason.

Pairs that fail today are in ``KNOWN_FAILURES`` (strict xfail with the current failure), so they
flip to an unexpected pass when fixed. Subsets: ``-k pnet``, ``-k pfa``, or ``ONNXSHRINK_ZOO_SHARD=i/n``
for the i-th of n rotating shards.
"""

import functools
import os

import numpy as np
import pytest

import realzoo
from onnxshrink.errors import ValidationFailed

pytestmark = pytest.mark.real

# (model, pass) -> the failure seen today (strict xfail). Figures from one run on 2 cores.
KNOWN_FAILURES = {
    ("mtcnn_pnet", "pfa"): "validation failed: output 'conv2d_4' cosine 0.8769 < 0.9; FLOPs 0.600 for a "
                           "0.9 target (steps of 8 channels on groups of 10/16/32); box recall 0.176 (0.676 at "
                           "pfa.channel_multiple=1, FLOPs 0.883)",
    ("mtcnn_pnet", "basisconv"): "validation passes but box recall 0.728 < 0.95 (FLOPs 0.769 for a 0.9 target)",
    ("oww_melspec", "lowrank"): "TargetError: params 0.978 (target 0.900): lowrank acts on 3.0 % of the params "
                                "(the mel MatMul; the STFT is two Conv1d it does not split), floor 0.978",
    ("oww_embedding", "pfa"): "validation passes but worst-sample embedding cosine 0.934 < 0.99 (FLOPs 0.880; "
                              "0.904 at pfa.channel_multiple=1, FLOPs 0.900)",
    ("oww_embedding", "basisconv"): "validation passes but worst-sample embedding cosine 0.909 < 0.99 (FLOPs 0.897)",
    ("khmer_segmenter", "pq"): "validation passes (the CRF emissions stay within the default gate) but the same "
                                "segmentation on 0.375 of the sentences < 0.9",
    ("captcha_crnn", "pfa"): "validation passes but the same text on 0.812 of the captchas < 0.9 (FLOPs 0.899)",
    ("captcha_crnn", "basisconv"): "validation passes but the same text on 0.844 of the captchas < 0.9 (FLOPs 0.897)",
}


def _pairs():
    pairs = [(m, p) for m in realzoo.ZOO for p in realzoo.PASSES]
    shard = os.environ.get("ONNXSHRINK_ZOO_SHARD")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        pairs = pairs[i::n]
    out = []
    for m, p in pairs:
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
    """The varying-shape variant (real sizes) runs through the original model; until the tool
    accepts feeds of different shapes, the fixed variant is what the pass tests use."""
    e = entry_or_skip(name)
    feeds = e.feeds("val", varying=True)
    outs = realzoo.run(e.model_path(), feeds[:8])
    assert len(outs) == min(8, len(feeds))


@pytest.mark.parametrize("name,pass_name", _pairs())
def test_pass_keeps_task(name, pass_name):
    e = entry_or_skip(name)
    if not realzoo.planned(e, pass_name):
        pytest.skip(f"{pass_name}: its plan touches no node of {name}")
    calib, val, orig = _data(name)
    try:
        res, _ = realzoo.shrink_entry(e, pass_name, calib, val)
    except ValidationFailed as exc:
        pytest.fail(f"{name}/{pass_name}: {exc}")
    realzoo.check_valid(res.model)
    assert res.report["validation"]["passed"]
    score = e.metric(orig, realzoo.run(res.model, val), val)
    assert score >= e.threshold, f"{name}/{pass_name}: {e.metric_name} {score:.3f} < {e.threshold}"
