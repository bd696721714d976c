"""The bench's zoo table (``bench/cases_zoo.py``): rows merged into the JSON file by (model, method),
rendered to markdown with failures in bold and short reasons, and a pair stopped at its CPU limit
recorded as a timeout. No package download: these run in the default suite."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cases_zoo


def _row(model, method, outcome, fidelity=None, **kw):
    return {"model": model, "method": method, "outcome": outcome, "fidelity": fidelity, "threshold": 0.95,
            "metric_name": "same label", **kw}


def test_table_merges_by_pair_and_renders(tmp_path):
    path = str(tmp_path / "zoo.json")
    cases_zoo.save_table({("mtcnn_rnet", "pfa"): _row("mtcnn_rnet", "pfa", "fail", 0.5, wall_s=3.0)}, path)
    table = cases_zoo.load_table(path)
    table[("mtcnn_rnet", "pfa")] = _row("mtcnn_rnet", "pfa", "pass", 1.0, params=0.98, flops=0.875, bytes=0.983,
                                        latency=0.7, wall_s=7.4, cpu_s=2.1, calib_s=2.5, calib_runs=3)
    table[("mtcnn_pnet", "pfa")] = _row(
        "mtcnn_pnet", "pfa", "fail", 0.176, wall_s=4.5,
        reason="validation failed: output 'conv2d_4' cosine 0.8769 < 0.9 (not saved; force=True returns it)")
    table[("mtcnn_pnet", "lowrank")] = _row("mtcnn_pnet", "lowrank", "n/a", reason="the plan names no node")
    cases_zoo.save_table(table, path)
    rows = json.load(open(path))
    assert [(r["model"], r["method"]) for r in rows] == [("mtcnn_pnet", "pfa"), ("mtcnn_pnet", "lowrank"),
                                                         ("mtcnn_rnet", "pfa")]   # zoo order, then pass order
    md = cases_zoo.render_markdown(cases_zoo.load_table(path)).splitlines()
    assert len(md) == 2 + 2 + 2   # header, two measured rows, blank line, the n/a line
    pnet = next(line for line in md if line.startswith("| mtcnn_pnet | pfa |"))
    assert "**0.176**" in pnet and "fail: validation failed: output 'conv2d_4' cosine 0.8769 < 0.9 |" in pnet
    rnet = next(line for line in md if line.startswith("| mtcnn_rnet | pfa |"))
    assert "| 0.980 | 0.875 | 0.983 | 0.70 |" in rnet and "| 1.000 | 7 (2) | 2.5 (3) | 3.0 | pass |" in rnet
    assert "**0.176** | 4 | – | – | fail:" in pnet    # a row measured before the calibration column
    assert md[-1].endswith("mtcnn_pnet/lowrank.")


@pytest.mark.skipif(not hasattr(signal, "SIGXCPU"), reason="CPU limits need POSIX rlimits")
def test_pair_over_its_cpu_limit_is_a_timeout(tmp_path, monkeypatch):
    """A child that spins past its CPU seconds is stopped by SIGXCPU and recorded as a timeout."""
    spin = tmp_path / "spin.py"
    spin.write_text("while True:\n    pass\n")
    real_popen = subprocess.Popen

    def popen(cmd, **kw):   # the child runs a spinning script instead of a zoo pair
        return real_popen([sys.executable, str(spin)], **kw)

    monkeypatch.setattr(cases_zoo.subprocess, "Popen", popen)
    t = time.perf_counter()
    rec = cases_zoo._run_child("mtcnn_rnet", "pfa", runs=0, latency=False, timeout=60, cpu_limit=1)
    assert time.perf_counter() - t < 50
    assert rec[0]["outcome"] == "timeout" and rec[0]["reason"] == "over 1 CPU s (stopped)", rec
    assert os.path.exists(spin)


def test_a_target_out_of_the_pass_reach_is_an_expected_unreachable_row():
    """A TargetError whose pass says it acts on too little of the model (its floor above the
    target) is recorded as "unreachable" with the share it acts on; one whose floor was low enough
    stays a failure."""
    from types import SimpleNamespace

    def exc(floor):
        report = {"targets": {"flops": {"target": 0.9, "reached": 0.993, "met": False}},
                  "passes": [{"name": "basisconv", "reach": {"acts_on": {"flops": 0.0076, "params": 0.009},
                                                             "floor": {"flops": floor, "params": 0.99}}}]}
        return SimpleNamespace(result=SimpleNamespace(report=report))

    assert cases_zoo.unreachable(exc(0.9925), "basisconv") == "basisconv acts on 0.8% of the flops; floor 0.993 (target 0.900)"
    assert cases_zoo.unreachable(exc(0.5), "basisconv") == ""
    assert cases_zoo.unreachable(exc(0.9925), "pfa") == ""    # another pass's reach says nothing
    row = _row("vit_focus", "basisconv", "unreachable", reason=cases_zoo.unreachable(exc(0.9925), "basisconv"))
    md = cases_zoo.render_markdown({("vit_focus", "basisconv"): row})
    assert "| unreachable (expected): basisconv acts on 0.8% of the flops; floor 0.993 (target 0.900) |" in md
