"""What a pass can act on: ``--inspect`` shows per budget pass the share of the model's params and
FLOPs it can change and the lowest fraction it alone could leave; a TargetError names the same
figures, so an unreachable target says why (here: lowrank on a model whose weights sit in a Conv)."""

import numpy as np
import pytest

from graphs import GraphBuilder
from onnxshrink import shrink
from onnxshrink.cost import model_cost
from onnxshrink.errors import TargetError
from onnxshrink.inspection import inspect_model
from onnxshrink.passes.lowrank import LowRank
from onnxshrink.registry import make_config


def _conv_heavy():
    """input(N,4,12,12) ─ Conv 3×3 (4→32) ─ Relu ─ GAP ─ Flatten ─ Gemm 32→24 ─ Relu ─ Gemm 24→6 ─ y

    Most params and FLOPs are in the Conv; lowrank (without lowrank.conv) can only factor the Gemms."""
    b = GraphBuilder(seed=11)
    x = b.input("input", ["batch", 4, 12, 12])
    h = b.relu(b.conv(x, 4, 32, k=3, pad=1))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    h = b.relu(b.gemm(h, 32, 24))
    b.gemm(h, 24, 6, out="y")
    b.output("y", ["batch", 6])
    return b.model()


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((n, 4, 12, 12)).astype(np.float32)}


def test_lowrank_reach_is_the_share_of_its_layers():
    model = _conv_heavy()
    p = LowRank()
    r = p.reach(model, make_config(p, {"rank_multiple": 1}), {"input": [1, 4, 12, 12]})
    cost = model_cost(model, {"input": [1, 4, 12, 12]})
    gemm_params = 32 * 24 + 24 + 24 * 6 + 6
    assert r["acts_on"]["params"] == pytest.approx(gemm_params / cost["params"], rel=1e-6)
    # each Gemm at rank 1: r·(d_in + d_out) + d_out
    floor = cost["params"] - gemm_params + (32 + 24 + 24) + (24 + 6 + 6)
    assert r["floor"]["params"] == pytest.approx(floor / cost["params"], rel=1e-6)
    assert 0.5 < r["floor"]["params"] < 1.0   # a params target of 0.5 is out of its reach


def test_target_error_states_what_is_reachable():
    model = _conv_heavy()
    with pytest.raises(TargetError) as info:
        shrink(model, ["lowrank"], calibration=_data(), target_params=0.5)
    msg = str(info.value)
    assert "reachable: lowrank acts on" in msg and "short of the target" in msg
    floor = float(msg.split("could leave at least ")[1].split(" ")[0])
    reached = float(msg.split("params ")[1].split(" ")[0])
    assert floor <= reached + 1e-3 and floor > 0.5
    rep = info.value.result.report["passes"][0]["reach"]
    assert rep["floor"]["params"] == pytest.approx(floor, abs=1e-3)
    # the passes outside the chain that could: pfa prunes the Conv's channels (its own reach)
    from onnxshrink.passes.pfa import Pfa
    pfa_floor = Pfa().reach(model, make_config(Pfa(), {}), {"input": [1, 4, 12, 12]})["floor"]["params"]
    assert pfa_floor < 0.5
    assert f"params 0.500 is within reach of pfa (alone it could leave {pfa_floor:.3f})" in msg
    could = info.value.result.report["targets"]["params"]["could_reach"]
    assert {c["pass"] for c in could} == {"pfa"} and could[0]["floor"] == pytest.approx(pfa_floor, abs=1e-4)


def test_target_error_says_when_no_other_pass_could_reach_it():
    """params 0.01: below every pass's floor (pfa keeps 8 channels a layer)."""
    with pytest.raises(TargetError) as info:
        shrink(_conv_heavy(), ["lowrank"], calibration=_data(), target_params=0.01)
    assert "no other pass alone could leave params 0.010" in str(info.value)
    assert info.value.result.report["targets"]["params"]["could_reach"] == []


def test_cli_missed_target_writes_only_with_force(tmp_path, capsys):
    """exit 1 and nothing written; with --force exit 3 and the best model found is written (the
    one the chain reached, as in the report), the failure on stderr."""
    import onnx
    from onnxshrink import cli
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(_conv_heavy(), str(src))
    np.savez(tmp_path / "c.npz", input=_data()["input"])
    argv = [str(src), str(out), "--passes", "lowrank", "--calibration-data", str(tmp_path / "c.npz"),
            "--target-params", "0.5", "--quiet", "--report", str(rep)]
    assert cli.main(argv) == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "target cannot be met" in err and "within reach of pfa" in err and "--force" in err
    assert cli.main(argv + ["--force"]) == 3 and out.exists()
    err = capsys.readouterr().err
    assert "target cannot be met" in err
    import json
    report = json.loads(rep.read_text())
    written = onnx.load(str(out))
    cost = model_cost(written, {"input": [1, 4, 12, 12]})["params"] / model_cost(_conv_heavy(), {"input": [1, 4, 12, 12]})["params"]
    assert cost == pytest.approx(report["targets"]["params"]["reached"], abs=1e-3) and cost < 0.9
    assert report["check_failed"] and "target cannot be met" in report["check_failed"]


def test_pfa_reach_enough_and_reached():
    model = _conv_heavy()
    res = shrink(model, ["pfa"], calibration=_data(), target_flops=0.6, force=True,
                 options={"pfa": {"channel_multiple": 4}})
    reach = res.report["passes"][0]["reach"]
    assert reach["acts_on"]["flops"] > 0.9 and reach["floor"]["flops"] < 0.6
    assert res.report["targets"]["flops"]["met"]


def test_inspect_prints_reach(tmp_path):
    import onnx
    path = str(tmp_path / "m.onnx")
    onnx.save(_conv_heavy(), path)
    out = inspect_model(path, "pfa,lowrank,basisconv")
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and "acts on" in ln}
    assert set(lines) == {"pfa", "lowrank", "basisconv"}
    p = LowRank()
    r = p.reach(onnx.load(path), make_config(p, {}), None)
    assert f"{100 * r['acts_on']['params']:.1f}% of params" in lines["lowrank"]


def _small_fcn():
    """input(N,3,24,24) ─ Conv 3×3 (3→10) ─ Relu ─ Conv 3×3 (10→16) ─ Relu ─ Conv 3×3 (16→32) ─ Relu
    ─ Conv 1×1 (32→2) ─ y          (a proposal net as small as MTCNN's P-Net)"""
    b = GraphBuilder(seed=5)
    x = b.input("input", ["batch", 3, 24, 24])
    h = b.relu(b.conv(x, 3, 10, k=3))
    h = b.relu(b.conv(h, 10, 16, k=3))
    h = b.relu(b.conv(h, 16, 32, k=3))
    b.conv(h, 32, 2, k=1, out="y")
    b.output("y")
    return b.model()


def test_pfa_says_when_channel_steps_overshoot():
    model = _small_fcn()
    rng = np.random.default_rng(1)
    data = {"input": rng.standard_normal((40, 3, 24, 24)).astype(np.float32)}
    coarse = shrink(model, ["pfa"], calibration=data, target_flops=0.9, force=True)
    reached = coarse.report["targets"]["flops"]["reached"]
    assert reached < 0.9 * 0.95   # 16 → 8 or 32 → 24: one step of 8 is more than the 10 % asked for
    note = coarse.report["passes"][0]["note"]
    assert "pfa.channel_multiple=8" in note and f"flops {reached:.3f}" in note
    fine = shrink(model, ["pfa"], calibration=data, target_flops=0.9, force=True,
                  options={"pfa": {"channel_multiple": 1}})
    assert 0.8 <= fine.report["targets"]["flops"]["reached"] <= 0.9 * 1.05
    assert "note" not in fine.report["passes"][0]


def test_lowrank_plan_leaves_out_layers_no_rank_makes_cheaper():
    """A classifier's last Gemm (32→2, like ResNet's 1024→2) has no paying rank: not a target."""
    b = GraphBuilder(seed=6)
    x = b.input("input", ["batch", 32])
    h = b.relu(b.gemm(x, 32, 64))
    b.gemm(h, 64, 2, out="y")
    b.output("y", ["batch", 2])
    model = b.model()
    p = LowRank()
    plan = p.plan(model, make_config(p, {}))
    last = [n.name for n in model.graph.node if n.op_type == "Gemm"][-1]
    assert last not in plan.nodes and len(plan.nodes) == 1
    assert any(s.node == last and "has fewer params" in s.reason for s in plan.skipped)
    assert p.plan(model, make_config(p, {"force": True})).nodes[-1] == last


def test_a_target_out_of_the_last_pass_reach_is_answered_before_any_run(monkeypatch):
    """The floor is known from the plan: the pass is not run (no calibration run, the model as
    it was) and the TargetError names its reach; a target within reach runs the pass."""
    from onnxshrink import calibrate
    runs = []
    real = calibrate.collect
    monkeypatch.setattr(calibrate, "collect", lambda *a, **k: runs.append(1) or real(*a, **k))
    import onnxshrink.pipeline as pipeline
    monkeypatch.setattr(pipeline, "calibrate_requests", calibrate.collect)
    with pytest.raises(TargetError) as info:
        shrink(_conv_heavy(), ["lowrank"], calibration=_data(), target_params=0.5)
    rep = info.value.result.report["passes"][0]
    assert rep["calibration_runs"] == 0 and not runs and rep["changed"] == []
    assert rep["not_run"].startswith("the target is out of the pass's reach: params 0.")
    v = info.value.result.report["validation"]
    assert v["samples"] == 0 and v["notes"][0].startswith("not compared on data: no pass ran")
    assert "lowrank acts on" in str(info.value)
    # forced, or within reach: the pass runs (and calibrates)
    res = shrink(_conv_heavy(), ["lowrank"], calibration=_data(), target_params=0.5, force=True)
    assert res.report["passes"][0]["calibration_runs"] > 0 and "not_run" not in res.report["passes"][0]
    assert model_cost(res.model, {"input": [1, 4, 12, 12]})["params"] < model_cost(_conv_heavy(),
                                                                                   {"input": [1, 4, 12, 12]})["params"]
