"""pq's tightened per-layer budget (``pq.tighten``): where the rule's model fails the default gate on
the calibration data, the rule is fitted again at 0.1x (then 0.01x) pq.max_error, each try judged on
held-out calibration units at half the gate's margins, the first that passes kept."""

import numpy as np
from test_pq import FAST, _mlp_calib

from graphs import GraphBuilder, run
from onnxshrink import shrink
from onnxshrink.errors import ValidationFailed
from onnxshrink.passes.pq.search import TIGHTEN


def _sharp_classifier(seed=0, temperature=20.0):
    """The wide MLP (64 -> 256 -> 256 -> 10) with a sharp softmax (logits x 20): a small logit error
    moves a probability far where two classes are close, as a many-way reader's near ties do."""
    b = GraphBuilder(seed)
    x = b.input("input", ["batch", 64])
    h = b.relu(b.gemm(x, 64, 256))
    h = b.relu(b.matmul(h, 256, 256))
    logits = b.gemm(h, 256, 10)
    b.node("Softmax", [b.node("Mul", [logits, b.const(np.array(temperature, np.float32))])], out="probs", axis=-1)
    b.output("probs", ["batch", 10])
    return b.model()


def _shrink(model, calib, val, **opts):
    try:
        return shrink(model, ["pq"], calibration=calib, validation=val, options={"pq": dict(FAST, **opts)}), True
    except ValidationFailed as exc:
        return exc.result, False


def test_a_rule_model_failing_the_gate_is_fitted_again_tighter():
    """At pq.max_error=3e-3 the rule's model fails the default gate on the calibration data (a probability
    0.351 off) and, without the tightening, on the held-out data too (top-1 agreement 0.92, a probability 0.64
    off). Tightened: the 0.1x fit passes the gate at half its margins on 64 held-out calibration units, is
    fitted again on all of them and passes the validation, with more bytes than the rule's."""
    model, calib, val = _sharp_classifier(), _mlp_calib(), _mlp_calib(200, seed=9)
    rule, rule_ok = _shrink(model, calib, val, max_error=3e-3, tighten=False)
    tight, tight_ok = _shrink(model, calib, val, max_error=3e-3)
    want = run(model, val)[0]
    got_rule, got_tight = run(rule.model, val)[0], run(tight.model, val)[0]
    agree = lambda got: float((got.argmax(1) == want.argmax(1)).mean())  # noqa: E731
    assert not rule_ok and "tighten" not in rule.report["passes"][0]
    assert agree(got_rule) < 0.95 and np.abs(got_rule - want).max() > 0.35
    info = tight.report["passes"][0]["tighten"]
    assert "probs" in info["gate"] and abs(info["bytes"] / rule.report["after"]["bytes"] - 1) < 0.01   # the rule's model
    assert info["held_out"] == info["samples"] == 64
    assert [t["scale"] for t in info["tries"]] == [TIGHTEN[0]] and info["tries"][0]["passed"]
    assert info["scale"] == TIGHTEN[0] and tight.report["after"]["bytes"] > rule.report["after"]["bytes"]
    assert tight_ok and agree(got_tight) >= 0.97 and np.abs(got_tight - want).max() < 0.35


def test_a_rule_model_within_the_gate_is_kept_as_it_is():
    """At the default pq.max_error (3e-4) the same model passes the gate on the calibration data: no
    tightening, the same model as without it."""
    model, calib, val = _sharp_classifier(), _mlp_calib(), _mlp_calib(200, seed=9)
    res, ok = _shrink(model, calib, val, max_error=3e-4)
    off, _ = _shrink(model, calib, val, max_error=3e-4, tighten=False)
    assert ok and "tighten" not in res.report["passes"][0]
    assert res.model.graph == off.model.graph
