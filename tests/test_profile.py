"""The report's per-pass timing (``--profile``): every second counted once, in one part; the refit
loop's solves counted as "fit" for every pass that refits."""

import time

import numpy as np
import onnx
import pytest

from models import digits
from onnxshrink import shrink
from onnxshrink.pipeline import TIMING_PARTS, PassContext, profile_table
from onnxshrink.validate import Tolerances


def _ctx():
    m = onnx.load(digits.model_path("mlp"))
    return PassContext(None, m, m)


def test_nested_timed_blocks_count_each_second_once():
    ctx = _ctx()
    with ctx.timed("fit"):
        time.sleep(0.05)
        with ctx.timed("search"):
            time.sleep(0.1)
            with ctx.timed("export"):
                time.sleep(0.05)
    t = ctx.timings
    assert 0.045 <= t["fit"] < 0.09, t
    assert 0.095 <= t["search"] < 0.14, t
    assert 0.045 <= t["export"] < 0.09, t
    assert sum(t.values()) < 0.25


@pytest.mark.parametrize("passes, kw", [
    (["pfa"], {"target_flops": 0.6}),
    (["lowrank"], {"target_params": 0.6}),
    (["hadamard"], {}),
])
def test_pass_timing_parts_sum_within_the_pass_and_fit_is_counted(passes, kw):
    name = "mlp" if passes != ["pfa"] else "cnn_plain"
    split = digits.load_split()
    calib = digits.to_model_input(split["x_train"][:160], digits.MODELS[name])
    val = digits.to_model_input(split["x_train"][160:224], digits.MODELS[name])
    res = shrink(onnx.load(digits.model_path(name)), passes, calibration=calib, validation=val,
                 tolerances=Tolerances(min_cosine=None), force=True, **kw)
    p = res.report["passes"][0]
    t = p["timing"]
    parts = sum(t[k] for k in TIMING_PARTS)
    assert parts <= p["seconds"] + 1e-3, (parts, p["seconds"])
    assert abs(parts + t["other"] - p["seconds"]) < 2e-3
    assert t["calibration_runs"] >= 1 and t["calibration"] > 0
    assert t["fit"] > 0, t          # the refit loop's solves
    table = profile_table(res.report)
    assert table.splitlines()[1].split()[0] == passes[0]
    assert float(table.splitlines()[1].split()[1]) == pytest.approx(p["seconds"], abs=0.01)
