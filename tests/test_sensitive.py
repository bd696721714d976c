"""The accuracy search's per-layer correction: a planted sensitive layer, which the passes' own
error proxy prunes first and the task cannot lose, is found, kept whole and named in the report,
and the model reached is smaller than the global bisection's alone; every budget pass honours the
protected set."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import cli, shrink
from onnxshrink.pipeline import PassContext
from onnxshrink.search import correct, smallest_within

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planted(seed=0):
    """Two branches added into the logits; fcA's neurons carry the task, fcB's do not::

        x(64) ─ fcA (diagonal, 64) ─ Relu ─ fcA2 (64→10) ─┐
           └─── fcB (64→128)       ─ Relu ─ fcB2 (128→10) ─┴─ Add ─ logits(10)

    fcA: 56 "task" neurons (x_i scaled by 1.5, independent, each with its own class direction in
    fcA2) and 8 large ones (x_i × 10) that add the same value to every logit. The large ones
    dominate fcA2's output variance, so pfa's reconstruction error prices the task neurons as
    nearly free; removing them breaks the argmax. fcB: 32 distinct neurons, each repeated 4 times,
    that add the same value to every logit: prunable to the floor without changing a top-1."""
    rng = np.random.default_rng(seed)
    d, task, nb, distinct = 64, 56, 128, 32
    scale = np.full(d, 10.0)
    scale[:task] = 1.5
    wa2 = np.ones((d, 10), np.float32)
    wa2[:task] = rng.standard_normal((task, 10))
    wb = np.repeat(rng.standard_normal((d, distinct)) / 8, nb // distinct, axis=1)
    wb2 = np.repeat(rng.standard_normal((nb, 1)), 10, axis=1)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for v, n in [
        (np.diag(scale), "wA"), (np.zeros(d), "bA"), (wa2, "wA2"), (wb, "wB"), (np.zeros(nb), "bB"), (wb2, "wB2")]]
    nodes = [helper.make_node("Gemm", ["x", "wA", "bA"], ["a"], name="fcA"),
             helper.make_node("Relu", ["a"], ["ha"], name="reluA"),
             helper.make_node("MatMul", ["ha", "wA2"], ["ya"], name="fcA2"),
             helper.make_node("Gemm", ["x", "wB", "bB"], ["b"], name="fcB"),
             helper.make_node("Relu", ["b"], ["hb"], name="reluB"),
             helper.make_node("MatMul", ["hb", "wB2"], ["yb"], name="fcB2"),
             helper.make_node("Add", ["ya", "yb"], ["logits"], name="add")]
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, rng.standard_normal((600, d)).astype(np.float32)


def _width(model, node):
    weight = next(n for n in model.graph.node if n.name == node).input[1]
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == weight).shape[1]


def test_the_planted_sensitive_layer_is_kept_and_the_model_is_smaller():
    model, x = planted()
    res = shrink(model, ["pfa"], calibration=x, metric="top1", max_drop=0.02)
    search = res.report["search"]
    corr = search["correction"]
    # the global bisection alone: every step below its choice prunes fcA and fails
    bisection = [s for s in search["steps"] if s["kind"] == "bisection"]
    assert corr["bisection_reached"] is not None and 0.6 < corr["bisection_reached"] < 0.9
    assert all(not s["within"] for s in bisection if s["fraction"] < corr["bisection_chosen"])
    # fcA measured as the most sensitive unit at the failing step, kept whole, and named with its figures
    top = corr["sensitivity"][0]
    assert top["unit"] == "pfa:fcA" and top["nodes"] == ["fcA"]
    assert top["drop_changed"] > 0.1 and top["drop_kept"] <= 0.02
    assert [p["unit"] for p in corr["protected"]] == ["pfa:fcA"]
    reason = corr["protected"][0]["reason"]
    assert reason.startswith("kept by the accuracy search") and f"{top['drop_changed']:.4g}" in reason
    pfa = res.report["passes"][0]
    assert {"node": "fcA", "reason": reason} in pfa["skipped"]
    assert _width(res.model, "fcA") == 64                       # the planted layer whole
    assert _width(res.model, "fcB") < 32                        # the redundant one pruned past its duplicates
    # smaller than the bisection alone, within the drop on the held-out validation feeds
    assert res.report["ratios"]["flops"] < corr["bisection_reached"] - 0.2
    assert res.report["ratios"]["flops"] < 0.5
    m = res.report["validation"]["metric"]
    assert m["within"] and m["drop"] <= 0.02
    assert len(search["steps"]) <= 8 + 2 * 8 - 1 + 4


def test_cli_max_drop_reports_the_kept_layer(tmp_path, capsys):
    model, x = planted()
    src, out, rep, calib = (tmp_path / n for n in ("planted.onnx", "small.onnx", "r.json", "calib.npy"))
    onnx.save(model, src)
    np.save(calib, x)
    code = cli.main([str(src), str(out), "--passes", "pfa", "--calibration-data", str(calib), "--metric", "top1",
                     "--max-drop", "0.02", "--report", str(rep), "--quiet"])
    assert code == 0 and out.exists()
    report = json.loads(rep.read_text())
    assert [p["unit"] for p in report["search"]["correction"]["protected"]] == ["pfa:fcA"]
    assert _width(onnx.load(out), "fcA") == 64 and report["ratios"]["flops"] < 0.5


def _synthetic():
    """Units a, b, c change at every budget below 1; b is the sensitive one (drop 0.3 once the
    budget goes below 0.7); kept whole, b leaves a floor of 0.3."""
    class U:
        def __init__(self, label, amount):
            self.label, self.nodes, self.amount = label, (label + "_node",), amount
    units = {"a": U("a", 0.5), "b": U("b", 0.2), "c": U("c", 0.1)}
    runs = []

    def run(f, protected=None):
        kept = {n[0] for n in (protected or {})}
        runs.append((f, frozenset(kept)))
        reached = max(f, 0.3) if "b" in kept else f
        return {"f": f, "kept": kept, "reached": reached}, reached

    def score(cand):
        return 0.9 - (0.3 if cand["f"] < 0.7 and "b" not in cand["kept"] else 0.0)

    def units_of(cand):
        return [u for k, u in units.items() if k not in cand["kept"]] if cand["f"] < 1 else []
    return run, score, units_of, runs


def test_correction_keeps_the_sensitive_unit_and_refines_below():
    run, score, units_of, runs = _synthetic()
    res = smallest_within(run, score, 0.9, 0.01, units_of=units_of)
    assert 0.7 <= res.best_step.fraction < 0.73
    bisection = res.best_step
    correct(res, run, score, 0.9, 0.01, units_of, max_units=2)
    assert res.bisection is bisection and res.failing.fraction < bisection.fraction and not res.failing.within
    # the two that changed most (a, b; not c) measured, the most sensitive first
    assert [s.unit.label for s in res.sensitivity] == ["b", "a"]
    assert res.sensitivity[0].gain == pytest.approx(0.3) and res.sensitivity[1].gain == pytest.approx(0.0)
    assert res.best_step.protected == ("b",) and res.best_step.reached == pytest.approx(0.3)
    assert res.protected() == {"b_node": res.sensitivity[0].reason()}
    kinds = [s.kind for s in res.steps]
    assert kinds.count("sensitivity") == 2 and kinds.count("correction") == 0 and "refine" in kinds
    assert len(runs) == len(res.steps) <= 8 + 2 * 2 - 1 + 4


def test_no_correction_when_no_unit_helps():
    run, _, units_of, _ = _synthetic()
    res = smallest_within(run, lambda c: 0.9 - (0.3 if c["f"] < 0.7 else 0.0), 0.9, 0.01, units_of=units_of)
    chosen = res.best_step
    correct(res, run, lambda c: 0.9 - (0.3 if c["f"] < 0.7 else 0.0), 0.9, 0.01, units_of)
    assert res.best_step is chosen and res.protected() == {}
    assert "lowers the drop" in res.note


REASON = "kept by the accuracy search: test"


@pytest.mark.parametrize("passes,model,kw,node", [
    ("pfa", "mlp", {"target_params": 0.5}, "/fc2/Gemm"),
    ("lowrank", "mlp", {"target_params": 0.5}, "/fc2/Gemm"),
    ("pq", "mlp", {}, "/fc2/Gemm"),
    ("hadamard", "mlp", {}, "/fc1/Gemm"),   # (its first layer: a later one is refit when its input changes)
    ("basisconv", "tiny_cnn", {"options": {"basisconv": {"energy": 0.8, "force": True}}}, "conv_11"),
])
def test_each_budget_pass_honours_the_protected_set(monkeypatch, passes, model, kw, node):
    init = PassContext.__init__

    def protecting(self, *a, **k):
        init(self, *a, **k)
        self.protected = {node: REASON}
    monkeypatch.setattr(PassContext, "__init__", protecting)
    if model == "tiny_cnn":
        from graphs import conv_bn_net
        original, data = conv_bn_net(), {"random_calibration": 64}
    else:
        original = onnx.load(os.path.join(ROOT, "models", f"{model}.onnx"))
        data = {"calibration": os.path.join(ROOT, "models", f"{model}_calib.npz")}
    res = shrink(original, [passes], force=True, quiet=True, **data, **kw)
    rep = res.report["passes"][0]
    assert {"node": node, "reason": REASON} in rep["skipped"]
    assert rep["changed"] and not any(c.split(" ")[0].split(":")[0] == node for c in rep["changed"])
    if passes != "pfa":   # (pfa refits a kept group's consumer, whose input channels may go)
        assert np.array_equal(_weight(res.model, node), _weight(original, node))


def _weight(model, node):
    n = next(x for x in model.graph.node if x.name == node)
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == n.input[1])
